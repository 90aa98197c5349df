"""Concept resurgence: benign fine-tuning on renders of *retained* concepts only (no image shows
the forgotten one). An erasure that only suppressed a direction the fine-tuning moves again
comes back without the attacker ever showing it (arXiv 2410.08074)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Attack, AttackResult, concept_shown_rate, register_attack
from .finetune import FineTuneSettings, attack_images, curve_details, fine_tune_curve


@dataclass
class ResurgenceConfig(FineTuneSettings):
    pass


def retained_rows(prompts, concept: str, n: int, seed: int):
    """Label rows of scenes that do not show ``concept``, with a training prompt each."""
    labels = prompts.sample_labels(n, np.random.default_rng(seed), exclude=prompts.target_groups((concept,)))
    return labels, [prompts.prompt(row, prompts.templates[i % len(prompts.templates)]) for i, row in enumerate(labels)]


@register_attack
class ResurgenceAttack(Attack):
    name = "resurgence"
    description = "fine-tune on k renders of retained concepts only; does the forgotten one come back?"
    config_class = ResurgenceConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        labels, texts = retained_rows(prompts, concept, cfg.renders, seed)
        images = attack_images(cfg, prompts, labels, texts, seed)
        curve = fine_tune_curve(model, images, texts, cfg,
                                lambda m: concept_shown_rate(m, judge, concept, prompts, cfg, seed), seed)
        return AttackResult(self.name, concept, before=dict(curve).get(0, curve[0][1]), after=curve[-1][1], curve=curve,
                            details=curve_details(cfg, curve))
