"""SFR-on (Huang et al., 2024, "Unified gradient-based machine unlearning with remain geometry
enhancement") for classifiers.

Every iteration takes a slow retain step; every ``forget_every`` iterations a fast forget step
(gradient ascent) comes first, so the retain steps after it correct the damage along the retain
loss's curvature (the fast-slow update standing in for the remain Hessian). Both are masked by
the Fisher ratio of forget to retained data:

    mask   = 1[ F_forget / F_retain >= gamma ]
    forget L_f = -alpha_t * CE(D_f) / sg(CE(D_f))^0.5     alpha_t cosine-decayed from ``alpha``
    retain L_r = CE(D_r)

The 1/sqrt(loss) weight is the reference code's adaptive ascent weight: it shrinks the step as
the forget loss grows, so ascent cannot run away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ...training import fisher_ratio_mask
from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class SFRonConfig(ClassifierConfig):
    iterations: int = field(default=60, metadata={"help": "iterations (each one retain step)"})
    forget_every: int = field(default=5, metadata={"help": "take a forget step every this many iterations"})
    alpha: float = field(default=2.0, metadata={"help": "initial weight of the forget step (cosine-decayed)"})
    gamma: float = field(default=1.0, metadata={"help": "Fisher-ratio threshold of the mask"})
    learning_rate: float = field(default=0.01, metadata={"help": "SGD learning rate"})

    def __post_init__(self):
        super().__post_init__()
        if self.iterations <= 0 or self.forget_every <= 0 or self.gamma <= 0 or self.alpha <= 0:
            raise ValueError("iterations, forget_every, gamma and alpha must be positive")


def diagonal_fisher(session, x, y) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared cross-entropy gradient."""
    batches = max(1, -(-len(x) // session.config.batch_size))
    total = session.gradients(lambda logits, labels: F.cross_entropy(logits, labels), x, y, squared=True)
    return {n: v / batches for n, v in total.items()}


@register_method
class SFRon(ClassifierMethod):
    name = "sfron"
    description = "SFR-on: Fisher-ratio mask, fast forget ascent and slow retain steps (remain geometry)"
    config_class = SFRonConfig

    def saliency_mask(self, session) -> dict[str, torch.Tensor]:
        return fisher_ratio_mask(diagonal_fisher(session, session.forget_x, session.forget_y),
                                 diagonal_fisher(session, session.retain_x, session.retain_y), self.config.gamma)

    def forget_loss(self, session, alpha: float) -> torch.Tensor:
        x, y = session.random_batch(session.forget_x, session.forget_y)
        ce = F.cross_entropy(session.net(x), y)
        return -alpha * ce / ce.detach().clamp_min(1e-6).sqrt()

    def retain_loss(self, session) -> torch.Tensor:
        x, y = session.random_batch(session.retain_x, session.retain_y)
        return F.cross_entropy(session.net(x), y)

    def run(self, session):
        cfg = self.config
        session.mask = self.saliency_mask(session)
        for it in range(cfg.iterations):
            if it % cfg.forget_every == 0:
                alpha = cfg.alpha * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
                session.step(self.forget_loss(session, alpha))
            session.step(self.retain_loss(session))
        return {}
