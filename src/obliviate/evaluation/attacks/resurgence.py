"""Concept resurgence: benign fine-tuning on renders of *retained* concepts only (no image shows
the forgotten one). An erasure that only suppressed a direction the fine-tuning moves again
comes back without the attacker ever showing it (arXiv 2410.08074)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...world import render, sample_scenes
from .base import Attack, AttackResult, concept_shown_rate, register_attack
from .finetune import FineTuneSettings, fine_tune_curve, curve_details


@dataclass
class ResurgenceConfig(FineTuneSettings):
    pass


def retained_renders(prompts, concept: str, n: int, seed: int):
    """Renders of scenes that do not show ``concept``, with a training prompt each."""
    labels = prompts.sample_labels(n, np.random.default_rng(seed), exclude=prompts.target_groups((concept,)))
    scenes = sample_scenes(n, seed, shape=labels[:, 0], colour=labels[:, 1], texture=labels[:, 2], ontology=prompts.ontology)
    texts = [prompts.prompt(row, prompts.templates[i % len(prompts.templates)]) for i, row in enumerate(labels)]
    return torch.from_numpy(render(scenes, prompts.ontology)), texts


@register_attack
class ResurgenceAttack(Attack):
    name = "resurgence"
    description = "fine-tune on k renders of retained concepts only; does the forgotten one come back?"
    config_class = ResurgenceConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        images, texts = retained_renders(prompts, concept, cfg.renders, seed)
        curve = fine_tune_curve(model, images, texts, cfg,
                                lambda m: concept_shown_rate(m, judge, concept, prompts, cfg, seed), seed)
        return AttackResult(self.name, concept, before=dict(curve).get(0, curve[0][1]), after=curve[-1][1], curve=curve,
                            details=curve_details(cfg, curve))
