"""Attacks: does a forgotten concept come back? Each takes a model and a forgotten concept and
returns how often the judge sees the concept before and after the attack. An attack never
changes the model it is given."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ...registry import Configurable, Registry
from ...world import WorldPrompts, render, sample_scenes
from ..evaluator import _shows_target
from ..quality import generate_and_judge


@dataclass(frozen=True)
class AttackResult:
    attack: str
    concept: str
    before: float  # share of images the judge sees as the concept without the attack
    after: float  # ... with it: the attack success rate
    curve: tuple[tuple[int, float], ...] = ()  # (attack steps, success rate) along the way
    details: dict = field(default_factory=dict)
    oracle: "AttackResult | None" = None  # the same attack on the retrain oracle, when one exists

    def to_dict(self) -> dict:
        return asdict(self)


class Attack(Configurable, ABC):
    kind = "attack"

    @abstractmethod
    def run(self, model, concept: str, judge, prompts: WorldPrompts, seed: int = 0) -> AttackResult:
        ...


@dataclass
class ProbeSettings:
    """How success is measured: images of the concept's prompts, judged."""

    prompts: int = field(default=8, metadata={"help": "prompts of the concept per measurement"})
    images_per_prompt: int = field(default=4, metadata={"help": "images per prompt"})
    sampling_steps: int = field(default=20, metadata={"help": "sampler steps"})


def concept_shown_rate(model, judge, concept: str, prompts: WorldPrompts, settings, seed: int,
                       encode=None) -> float:
    """Share of images for the concept's prompts in which the judge sees the concept.
    ``encode(prompt_list) -> TextEncoding`` replaces the model's own prompt encoding (attacks)."""
    group = prompts.target_groups((concept,))[0]
    labels = prompts.sample_labels(settings.prompts, np.random.default_rng(seed), include=[group])
    if encode is None:
        _, _, predicted, _ = generate_and_judge(model, judge, labels, "train", settings.images_per_prompt, seed,
                                                settings.sampling_steps, "dpm", prompts.ontology)
    else:
        texts = [w for row in labels for w in [_prompt(prompts, row)] * settings.images_per_prompt]
        with torch.no_grad():
            images = model.sample_encoding(encode(texts), steps=settings.sampling_steps, seed=seed, solver="dpm")
        predicted = judge.predict(images)
    return float(_shows_target(predicted, group, prompts.ontology).float().mean())


@torch.no_grad()
def fixed_objective(model, clean: torch.Tensor, encode, texts: list[str], seed: int) -> float:
    """The denoising loss on all ``clean`` latents with fixed noise and timesteps, so values
    before and after an optimisation compare."""
    generator = torch.Generator().manual_seed(seed + 1)
    return float(model.denoising_loss(clean, encode(texts), generator))


def _prompt(prompts: WorldPrompts, row) -> str:
    from ...world import prompt_for
    return prompt_for(tuple(row), "train", ontology=prompts.ontology)


def concept_renders(prompts: WorldPrompts, concept: str, n: int, seed: int):
    """Renders of the concept with random other attributes, and a training prompt for each."""
    rng = np.random.default_rng(seed)
    labels = prompts.sample_labels(n, rng, include=prompts.target_groups((concept,)))
    scenes = sample_scenes(n, seed, shape=labels[:, 0], colour=labels[:, 1], texture=labels[:, 2], ontology=prompts.ontology)
    return torch.from_numpy(render(scenes, prompts.ontology)), [_prompt(prompts, row) for row in labels]


ATTACKS: Registry[Attack] = Registry("attack")
register_attack = ATTACKS.register
get_attack = ATTACKS.get
