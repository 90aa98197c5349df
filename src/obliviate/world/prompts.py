"""Prompt templates for the embedded world.

Training templates and synonyms are what the model sees; held-out templates and synonyms are
never trained on and measure whether an erasure generalises beyond the words of the request.
"""

from __future__ import annotations

import numpy as np

from .ontology import DEFAULT_ONTOLOGY, Ontology

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {texture} {colour} {shape}",
    "a {colour} {shape} with a {texture} pattern",
    "an image of a {texture} {colour} {shape}",
    "{colour} {shape}, {texture}",
    "a drawing of a {colour} {shape} that is {texture}",
    "a {shape} in {colour}, {texture} style",
    "a {texture} {shape} in {colour}",
)

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture showing a {colour} {texture} {shape}",
    "there is a {texture} {shape} coloured {colour}",
    "icon: {shape}, {colour}, {texture}",
)

SPLITS = ("train", "heldout_template", "heldout_synonym")


def format_prompt(template: str, shape: str, colour: str, texture: str) -> str:
    return template.format(shape=shape, colour=colour, texture=texture)


def prompt_for(labels: tuple[int, int, int], split: str = "train", variant: int = 0,
               ontology: Ontology = DEFAULT_ONTOLOGY) -> str:
    """A deterministic prompt for (shape, colour, texture) class indices.

    ``split`` picks the vocabulary: ``train`` uses training templates and concept names,
    ``heldout_template`` held-out templates with concept names, ``heldout_synonym`` training
    templates with held-out synonyms. ``variant`` cycles through the templates.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown prompt split {split!r}; choose one of {SPLITS}")
    concepts = [ontology.in_domain(d)[i] for d, i in zip(ontology.domains, labels)]
    templates = HELDOUT_TEMPLATES if split == "heldout_template" else TRAIN_TEMPLATES
    words = [c.heldout_synonyms[variant % len(c.heldout_synonyms)] if split == "heldout_synonym" else c.name for c in concepts]
    return format_prompt(templates[variant % len(templates)], *words)


def training_prompts(labels: np.ndarray, rng: np.random.Generator, ontology: Ontology = DEFAULT_ONTOLOGY) -> list[str]:
    """Random training prompts for a batch of (shape, colour, texture) labels: a random training
    template, and for each concept its name or one of its training synonyms."""
    domains = [ontology.in_domain(d) for d in ontology.domains]
    prompts = []
    for row in labels:
        words = []
        for concepts, index in zip(domains, row):
            choices = (concepts[index].name, *concepts[index].train_synonyms)
            words.append(choices[rng.integers(len(choices))])
        prompts.append(format_prompt(TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))], *words))
    return prompts
