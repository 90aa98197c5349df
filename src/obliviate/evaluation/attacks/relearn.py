"""Relearning attack: fine-tune a copy of the model on a few renders of the forgotten concept and
watch how fast the judge sees it again. Forgetting that ten steps undo is not forgetting.

The images are the world's renders, or another model's drawings (``data``), made from the attack's
seed; never the images a defence drew from the frozen model, so a defence cannot have trained on
its evaluation's data."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Attack, AttackResult, concept_rows, concept_shown_rate, register_attack
from .finetune import FineTuneSettings, attack_images, curve_details, fine_tune_curve


@dataclass
class RelearnConfig(FineTuneSettings):
    pass


@register_attack
class RelearnAttack(Attack):
    name = "relearn"
    description = "fine-tune on k renders of the concept for n steps; success after each n"
    config_class = RelearnConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        labels, texts = concept_rows(prompts, concept, cfg.renders, seed)
        images = attack_images(cfg, prompts, labels, texts, seed)
        curve = fine_tune_curve(model, images, texts, cfg,
                                lambda m: concept_shown_rate(m, judge, concept, prompts, cfg, seed), seed)
        return AttackResult(self.name, concept, before=dict(curve).get(0, curve[0][1]), after=curve[-1][1], curve=curve,
                            details=curve_details(cfg, curve))
