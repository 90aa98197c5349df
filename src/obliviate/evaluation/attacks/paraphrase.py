"""Paraphrase attack: a discrete search over wordings for the prompts that bring a forgotten
concept back most, in the manner of HUB's paraphrase facet and Ring-A-Bell's prompt search but
without gradients, so it runs on any store (text-space edits and closed forms included).

The search space is every template (the model's training templates, the held-out ones and any
the user passes in a file) crossed with every word for the concept (the ontology's name, training and
held-out synonyms, and any the user passes). ``candidates`` of these are screened on a few images
each; the ``top`` best are then measured afresh, on other label rows and other noise, so the
reported rate is not inflated by the luck that picked them. ``after`` is the best re-measured
rate, ``before`` the rate of the plain prompts every attack starts from.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...world.prompts import HELDOUT_TEMPLATES, format_prompt
from ..evaluator import _shows_target
from .base import Attack, AttackResult, ProbeSettings, concept_shown, register_attack

_PLACEHOLDERS = {"shape": "shape", "colour": "colour", "texture": "texture"}


@dataclass
class ParaphraseConfig(ProbeSettings):
    candidates: int = field(default=48, metadata={"help": "wordings screened (sampled when the space is larger)"})
    screen_images: int = field(default=4, metadata={"help": "images per wording while screening"})
    top: int = field(default=4, metadata={"help": "best-screened wordings measured afresh"})
    words: tuple[str, ...] = field(default=(), metadata={
        "help": "extra words or phrases for the concept, comma-separated (single-domain concepts)"})
    templates_file: str | None = field(default=None, metadata={
        "help": "a text file of extra templates, one a line, with {shape}, {colour} and {texture} slots"})

    def __post_init__(self):
        for name in ("candidates", "screen_images", "top", "prompts", "images_per_prompt", "sampling_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.templates = self._read_templates()

    def _read_templates(self) -> tuple[str, ...]:
        if self.templates_file is None:
            return ()
        try:
            lines = Path(self.templates_file).read_text().splitlines()
        except OSError as error:
            raise ValueError(f"Cannot read templates_file {self.templates_file!r}: {error.strerror}.") from None
        templates = tuple(line.strip() for line in lines if line.strip())
        for template in templates:
            try:
                format_prompt(template, "shape", "colour", "texture")
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"Template {template!r} must use only the slots {{shape}}, {{colour}}, {{texture}} "
                                 f"(and {{shapes}}): {error!r}") from None
            if not any(f"{{{slot}}}" in template for slot in ("shape", "shapes", "colour", "texture")):
                raise ValueError(f"Template {template!r} names no attribute slot; it cannot carry the concept.")
        return templates


@dataclass(frozen=True)
class Wording:
    template: str
    words: tuple[tuple[str, str], ...]  # (domain, word) for each domain the concept names

    def fill(self, prompts, row) -> str:
        return prompts.prompt(row, self.template, dict(self.words))

    def describe(self) -> str:
        return format_prompt(self.template, **{**_PLACEHOLDERS, **dict(self.words)})


@register_attack
class ParaphraseAttack(Attack):
    name = "paraphrase"
    description = "search templates and synonyms (ontology's and the user's) for prompts that bring the concept back"
    config_class = ParaphraseConfig

    def wordings(self, concept: str, prompts) -> list[Wording]:
        """Every (template, words) the search may try for ``concept``."""
        cfg = self.config
        concepts = prompts.target_concepts((concept,))
        if cfg.words and len(concepts) != 1:
            raise ValueError(f"Extra words name one concept; {concept!r} is {len(concepts)} concepts. "
                             "Pass the words in a template instead.")
        vocabularies = [[(c.domain, w) for w in dict.fromkeys((*c.words, *cfg.words))] for c in concepts]
        templates = list(dict.fromkeys((*prompts.templates, *HELDOUT_TEMPLATES, *cfg.templates)))
        return [Wording(t, words) for t in templates for words in itertools.product(*vocabularies)]

    def _rates(self, model, judge, concept, prompts, wordings, rows, images_per_row, seed) -> torch.Tensor:
        """Share of images showing the concept, per wording, on the same rows and noise."""
        texts = [w.fill(prompts, row) for w in wordings for row in rows for _ in range(images_per_row)]
        with torch.no_grad():
            images = model.sample_encoding(model.encode(texts), steps=self.config.sampling_steps, seed=seed, solver="dpm")
            shown = _shows_target(judge.predict(images), prompts.target_groups((concept,))[0], prompts.ontology)
        return shown.float().reshape(len(wordings), -1).mean(1)

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        rng = np.random.default_rng(seed)
        space = self.wordings(concept, prompts)
        chosen = [space[i] for i in sorted(rng.choice(len(space), min(cfg.candidates, len(space)), replace=False))]
        group = prompts.target_groups((concept,))[0]
        screen_rows = prompts.sample_labels(cfg.screen_images, rng, include=[group])
        screened = self._rates(model, judge, concept, prompts, chosen, screen_rows, 1, seed)
        best = torch.argsort(screened, descending=True, stable=True)[:cfg.top].tolist()
        # fresh rows and noise: the rate that is reported did not help choose the wording
        fresh_rows = prompts.sample_labels(cfg.prompts, np.random.default_rng(seed + 1), include=[group])
        measured = self._rates(model, judge, concept, prompts, [chosen[i] for i in best], fresh_rows,
                               cfg.images_per_prompt, seed + 1)
        before = float(concept_shown(model, judge, concept, prompts, cfg, seed).float().mean())
        ranking = sorted(zip(best, measured.tolist()), key=lambda pair: -pair[1])
        after = ranking[0][1]
        return AttackResult(self.name, concept, before, after, curve=((0, before), (len(chosen), after)),
                            details={"best_prompts": [{"prompt": chosen[i].describe(), "screened": round(float(screened[i]), 4),
                                                       "measured": round(rate, 4)} for i, rate in ranking],
                                     "screened_mean": round(float(screened.mean()), 4), "space": len(space),
                                     "screened": len(chosen), "seed": seed})
