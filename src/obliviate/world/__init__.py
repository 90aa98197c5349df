"""The embedded concept world: ontology, renderer and prompts, with exact ground truth."""

from .ontology import CONCEPTS, DEFAULT_ONTOLOGY, DOMAINS, Concept, Ontology
from .prompts import (DEFAULT_LANGUAGE, HELDOUT_TEMPLATES, LANGUAGES, SPLITS, Language, language,
                      prompt_for, training_prompts)
from .targets import FreeTextPrompts, PromptPair, PromptSource, TargetSource, WorldPrompts
from .render import IMAGE_SIZE, SceneBatch, render, sample_scenes

__all__ = [
    "CONCEPTS", "DEFAULT_ONTOLOGY", "DOMAINS", "Concept", "Ontology",
    "DEFAULT_LANGUAGE", "HELDOUT_TEMPLATES", "LANGUAGES", "SPLITS", "Language", "language",
    "prompt_for", "training_prompts",
    "FreeTextPrompts", "PromptPair", "PromptSource", "TargetSource", "WorldPrompts", "IMAGE_SIZE", "SceneBatch", "render", "sample_scenes",
]
