"""Prompt templates and languages of the embedded world.

A ``Language`` is what a world model was trained to read: its sentence templates and, for each
concept, the words that name it (the name and some of the ontology's training synonyms). Held-out
templates and held-out synonyms are never trained on in any language; they measure whether a
model, and an erasure, generalise beyond the words they were taught.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .ontology import DEFAULT_ONTOLOGY, Concept, Ontology

V1_TEMPLATES: tuple[str, ...] = (
    "a {texture} {colour} {shape}",
    "a {colour} {shape} with a {texture} pattern",
    "an image of a {texture} {colour} {shape}",
    "{colour} {shape}, {texture}",
    "a drawing of a {colour} {shape} that is {texture}",
    "a {shape} in {colour}, {texture} style",
    "a {texture} {shape} in {colour}",
)

# v2 adds word order, filler words, short and long prompts and plurals ({shapes}). None uses a
# held-out template's wording ("picture", "showing", "there is", "coloured", "icon").
V2_TEMPLATES: tuple[str, ...] = V1_TEMPLATES + (
    "{texture} {colour} {shape}",
    "{colour} {texture} {shape}",
    "{shape}: {colour} and {texture}",
    "{texture} {colour} {shapes}",
    "the {colour} {shape}, {texture}",
    "one {texture} {shape}, in {colour}",
    "a single {colour} {shape} with a {texture} fill",
    "a small {texture} {colour} {shape} in the middle",
    "a {texture} {colour} {shape} on a dark background",
    "a simple drawing: a {colour} {shape}, {texture}",
    "draw a {colour} {shape} with a {texture} surface",
    "please draw a {texture} {shape} in {colour}",
    "a photo of a {texture} {colour} {shape}",
    "a render of a {colour} {shape}, {texture} texture",
    "a {shape} that is {colour} and {texture}",
    "a {shape}, {texture}, {colour}",
    "{colour}, {texture}, {shape}",
    "{shapes} in {colour}, {texture}",
    "some {texture} {colour} {shapes}",
    "a sketch of a {texture} {shape}, {colour}",
    "a {colour} one: a {texture} {shape}",
    "clip art of a {colour} {texture} {shape}",
    "a sticker of a {texture} {colour} {shape}",
    "an illustration with a {colour} {shape} that has a {texture} look",
    "a {texture}-looking {shape} painted {colour}",
    "a {shape} painted in {colour} with a {texture} finish",
    "shape {shape}, colour {colour}, texture {texture}",
    "{colour} {shapes} with {texture} patterns",
    "a {colour} {shape} drawn in a {texture} way",
    "a {texture} {shape}",  # short prompts leave an attribute to the model
)

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture showing a {colour} {texture} {shape}",
    "there is a {texture} {shape} coloured {colour}",
    "icon: {shape}, {colour}, {texture}",
)

SPLITS = ("train", "train_synonym", "heldout_template", "heldout_synonym")


def plural(word: str) -> str:
    """English plural of a (last) word: 'box' -> 'boxes', 'love heart' -> 'love hearts'."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


@dataclass(frozen=True)
class Language:
    """The templates and words a world model is trained on. ``synonyms`` is how many of each
    concept's training synonyms it knows (all of them when ``None``)."""

    name: str
    templates: tuple[str, ...]
    synonyms: int | None = None

    def words(self, concept: Concept) -> tuple[str, ...]:
        """The words this language names ``concept`` with: the name, then its known synonyms."""
        return (concept.name, *concept.train_synonyms[:self.synonyms])

    def synonyms_of(self, concept: Concept) -> tuple[str, ...]:
        return self.words(concept)[1:]

    def random_word(self, concept: Concept, rng: np.random.Generator) -> str:
        """The concept's name or one of its known synonyms, uniformly."""
        choices = self.words(concept)
        return choices[int(rng.integers(len(choices)))]

    @cached_property
    def full_templates(self) -> tuple[str, ...]:
        """The templates that name every attribute: prompts that must show a concept use these."""
        return tuple(t for t in self.templates if all(f"{{{d}}}" in t or f"{{{d}s}}" in t for d in ("shape", "colour", "texture")))


LANGUAGES: dict[str, Language] = {
    "v1": Language("v1", V1_TEMPLATES, synonyms=1),
    "v2": Language("v2", V2_TEMPLATES),
}
DEFAULT_LANGUAGE = LANGUAGES["v2"]


def language(name: str) -> Language:
    if name not in LANGUAGES:
        raise ValueError(f"Unknown world language {name!r}; known: {', '.join(LANGUAGES)}.")
    return LANGUAGES[name]


def format_prompt(template: str, shape: str, colour: str, texture: str) -> str:
    return template.format(shape=shape, shapes=plural(shape), colour=colour, texture=texture)


def prompt_for(labels: tuple[int, int, int], split: str = "train", variant: int = 0,
               ontology: Ontology = DEFAULT_ONTOLOGY, lang: Language = DEFAULT_LANGUAGE) -> str:
    """A deterministic prompt for (shape, colour, texture) class indices.

    ``split`` picks the vocabulary: ``train`` uses the language's templates and concept names,
    ``train_synonym`` its templates with its training synonyms, ``heldout_template`` held-out
    templates with concept names, ``heldout_synonym`` its templates with held-out synonyms.
    ``variant`` cycles through the templates and synonyms.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown prompt split {split!r}; choose one of {SPLITS}")
    concepts = [ontology.in_domain(d)[i] for d, i in zip(ontology.domains, labels)]
    templates = HELDOUT_TEMPLATES if split == "heldout_template" else lang.full_templates
    choices = {"train_synonym": lambda c: lang.synonyms_of(c) or (c.name,),
               "heldout_synonym": lambda c: c.heldout_synonyms}.get(split, lambda c: (c.name,))
    words = [choices(c)[variant % len(choices(c))] for c in concepts]
    return format_prompt(templates[variant % len(templates)], *words)


def training_prompts(labels: np.ndarray, rng: np.random.Generator, ontology: Ontology = DEFAULT_ONTOLOGY,
                     lang: Language = DEFAULT_LANGUAGE) -> list[str]:
    """Random training prompts for a batch of (shape, colour, texture) labels: per concept a
    random known word, then a random template of the language."""
    domains = [ontology.in_domain(d) for d in ontology.domains]
    prompts = []
    for row in labels:
        words = [lang.random_word(concepts[i], rng) for concepts, i in zip(domains, row)]
        prompts.append(format_prompt(lang.templates[rng.integers(len(lang.templates))], *words))
    return prompts
