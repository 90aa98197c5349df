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


@dataclass(frozen=True)
class AttackResult:
    attack: str
    concept: str
    before: float  # share of images the judge sees as the concept without the attack
    after: float  # ... with it: the attack success rate
    curve: tuple[tuple[int, float], ...] = ()  # (attack steps, success rate) along the way
    details: dict = field(default_factory=dict)
    oracle: "AttackResult | None" = None  # the same attack on the retrain oracle, when one exists

    @property
    def auc(self) -> float | None:
        """Relearnability, for fine-tuning attacks: ``curve_auc`` of their curve (``None`` for
        other attacks, whose curve is only before and after)."""
        return self.details.get("auc")

    @property
    def auc_gap(self) -> float | None:
        """``auc`` minus the retrain oracle's under the same attack (``None`` without one)."""
        if self.auc is None or self.oracle is None or self.oracle.auc is None:
            return None
        return self.auc - self.oracle.auc

    def to_dict(self) -> dict:
        out = asdict(self)
        out["auc_gap"] = self.auc_gap
        return out


def curve_auc(curve) -> float | None:
    """Trapezoid area under (steps, rate) points divided by the step range: the mean success
    over the attack; ``None`` with fewer than two step counts."""
    points = sorted(curve)
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    area = sum((s1 - s0) * (r0 + r1) / 2 for (s0, r0), (s1, r1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


class Attack(Configurable, ABC):
    kind = "attack"
    curve_axis = "fine-tuning steps"  # what the x of ``AttackResult.curve`` counts, for printing

    @abstractmethod
    def run(self, model, concept: str, judge, prompts: WorldPrompts, seed: int = 0) -> AttackResult:
        ...


@dataclass
class ProbeSettings:
    """How success is measured: images of the concept's prompts, judged."""

    prompts: int = field(default=8, metadata={"help": "prompts of the concept per measurement"})
    images_per_prompt: int = field(default=4, metadata={"help": "images per prompt"})
    sampling_steps: int = field(default=20, metadata={"help": "sampler steps"})


def concept_prompts(prompts: WorldPrompts, concept: str, settings, seed: int,
                    words: dict[str, str] | None = None) -> list[str]:
    """The prompts an attack's success is measured on, one per image: ``settings.prompts`` label
    rows showing the concept, the training templates in turn, ``images_per_prompt`` each.
    ``words`` puts other words in some domains' places (e.g. a learned token for the concept);
    everything else, rows and templates included, stays the same."""
    group = prompts.target_groups((concept,))[0]
    labels = prompts.sample_labels(settings.prompts, np.random.default_rng(seed), include=[group])
    return [prompts.prompt(row, prompts.templates[i % len(prompts.templates)], words)
            for i, row in enumerate(labels) for _ in range(settings.images_per_prompt)]


def concept_shown(model, judge, concept: str, prompts: WorldPrompts, settings, seed: int,
                  words: dict[str, str] | None = None, encode=None) -> torch.Tensor:
    """Per image of ``concept_prompts``: does the judge see the concept? Image i starts from the
    same noise in every call with the same ``seed``. ``encode(prompt_list) -> TextEncoding``
    replaces the model's own prompt encoding (attacks), so an attack's before and after differ
    only in what the attack changed."""
    texts = concept_prompts(prompts, concept, settings, seed, words)
    with torch.no_grad():
        encoding = (encode or model.encode)(texts)
        images = model.sample_encoding(encoding, steps=settings.sampling_steps, seed=seed, solver="dpm")
        predicted = judge.predict(images)
    return _shows_target(predicted, prompts.target_groups((concept,))[0], prompts.ontology)


def judged_rate(judge, images: torch.Tensor, concept: str, prompts: WorldPrompts) -> float:
    """Share of ``images`` in which the judge sees ``concept``."""
    with torch.no_grad():
        shown = _shows_target(judge.predict(images), prompts.target_groups((concept,))[0], prompts.ontology)
    return float(shown.float().mean())


def concept_shown_rate(model, judge, concept: str, prompts: WorldPrompts, settings, seed: int,
                       words: dict[str, str] | None = None, encode=None) -> float:
    """Share of images in which the judge sees the concept (see ``concept_shown``)."""
    return float(concept_shown(model, judge, concept, prompts, settings, seed, words, encode).float().mean())


@torch.no_grad()
def fixed_objective(model, clean: torch.Tensor, encode, texts: list[str], seed: int) -> float:
    """The denoising loss on all ``clean`` latents with fixed noise and timesteps, so values
    before and after an optimisation compare."""
    generator = torch.Generator().manual_seed(seed + 1)
    return float(model.denoising_loss(clean, encode(texts), generator))


def concept_rows(prompts: WorldPrompts, concept: str, n: int, seed: int, words: dict[str, str] | None = None):
    """``n`` label rows showing the concept with random other attributes, and a training prompt
    for each (``words`` as in ``concept_prompts``)."""
    labels = prompts.sample_labels(n, np.random.default_rng(seed), include=prompts.target_groups((concept,)))
    return labels, [prompts.prompt(row, prompts.templates[0], words) for row in labels]


def render_rows(prompts: WorldPrompts, labels: np.ndarray, seed: int) -> torch.Tensor:
    """The world's renders of label rows (scene layout seeded by ``seed``)."""
    scenes = sample_scenes(len(labels), seed, shape=labels[:, 0], colour=labels[:, 1], texture=labels[:, 2],
                           ontology=prompts.ontology)
    return torch.from_numpy(render(scenes, prompts.ontology))


def concept_renders(prompts: WorldPrompts, concept: str, n: int, seed: int, words: dict[str, str] | None = None):
    """Renders of ``concept_rows`` (seeded by ``seed``), and their prompts."""
    labels, texts = concept_rows(prompts, concept, n, seed, words)
    return render_rows(prompts, labels, seed), texts


ATTACKS: Registry[Attack] = Registry("attack")
register_attack = ATTACKS.register
get_attack = ATTACKS.get
