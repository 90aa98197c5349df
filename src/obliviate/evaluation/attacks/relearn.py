"""Relearning attack: fine-tune a copy of the model on a few renders of the forgotten concept and
watch how fast the judge sees it again. Forgetting that ten steps undo is not forgetting."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .base import Attack, AttackResult, ProbeSettings, concept_renders, concept_shown_rate, register_attack


@dataclass
class RelearnConfig(ProbeSettings):
    renders: int = field(default=16, metadata={"help": "k, renders of the concept to fine-tune on"})
    checkpoints: tuple[int, ...] = field(default=(0, 5, 10, 20), metadata={"help": "step counts at which to measure"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=8, metadata={"help": "renders per step"})

    def __post_init__(self):
        if self.renders <= 0 or self.batch_size <= 0 or not self.checkpoints or min(self.checkpoints) < 0:
            raise ValueError("renders and batch_size must be positive and checkpoints non-negative step counts")


@register_attack
class RelearnAttack(Attack):
    name = "relearn"
    description = "fine-tune on k renders of the concept for n steps; success after each n"
    config_class = RelearnConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        images, texts = concept_renders(prompts, concept, cfg.renders, seed)
        attacked = copy.copy(model)
        attacked.unet = copy.deepcopy(model.unet)
        optimizer = torch.optim.Adam(attacked.unet.parameters(), lr=cfg.learning_rate)
        generator = torch.Generator().manual_seed(seed)
        clean_all = attacked.to_latents(images)
        curve, done = [], 0
        for target in sorted(set(cfg.checkpoints)):
            attacked.unet.train()
            for _ in range(target - done):
                index = torch.randint(0, len(texts), (cfg.batch_size,), generator=generator)
                loss = attacked.denoising_loss(clean_all[index], attacked.encode([texts[i] for i in index]), generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            done = target
            attacked.unet.eval()
            curve.append((target, concept_shown_rate(attacked, judge, concept, prompts, cfg, seed)))
        rates = dict(curve)
        return AttackResult(self.name, concept, before=rates.get(0, curve[0][1]), after=curve[-1][1], curve=tuple(curve),
                            details={"renders": cfg.renders, "learning_rate": cfg.learning_rate})
