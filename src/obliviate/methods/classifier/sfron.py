"""SFR-on (Huang et al., 2024, "Unified gradient-based machine unlearning with remain geometry
enhancement") for classifiers, as the authors' code runs it.

Every iteration takes a slow retain step; every ``forget_every`` iterations a fast forget step
(gradient ascent) comes first, so the retain steps after it correct the damage along the retain
loss's curvature (the fast-slow update standing in for the remain Hessian). The forget step is
masked by the Fisher ratio of forget to retained data and its gradient clipped:

    mask   = 1[ F_forget / F_retain >= gamma ]
    forget L_f = -alpha_t * mean_i( w_i * CE_i ),   w_i = N * l_i / sum_j l_j,   l_i = sg(CE_i)^-0.5
    retain L_r = CE(D_r)

alpha_t decays from ``alpha`` by a cosine, and so does the SGD learning rate. The per-sample
weights favour examples not yet forgotten (small loss), sum to the batch size, and shrink the
step as the forget losses grow, so ascent cannot run away.

``weighting=batch`` (one weight 1/sg(CE)^0.5 for the whole batch), ``mask_retain=true`` and
``lr_schedule=constant`` give obliviate's earlier variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ...training import fisher_ratio_mask
from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


WEIGHTINGS = ("per-sample", "batch")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class SFRonConfig(ClassifierConfig):
    iterations: int = field(default=1500, metadata={"help": "iterations (each one retain step)"})
    forget_every: int = field(default=5, metadata={"help": "take a forget step every this many iterations"})
    alpha: float = field(default=25.0, metadata={"help": "initial weight of the forget step (cosine-decayed)"})
    gamma: float = field(default=1.0, metadata={"help": "Fisher-ratio threshold of the mask"})
    learning_rate: float = field(default=0.01, metadata={"help": "SGD learning rate"})
    weighting: str = field(default="per-sample", metadata={"help": "ascent weight 1/CE^0.5: per-sample (normalised in the batch) or batch"})
    clip_norm: float = field(default=7.0, metadata={"help": "gradient-norm clip of the forget step (0: none)"})
    mask_retain: bool = field(default=False, metadata={"help": "mask the retain step too (the reference masks the forget step only)"})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine (the reference) or constant"})

    def __post_init__(self):
        super().__post_init__()
        if self.iterations <= 0 or self.forget_every <= 0 or self.gamma <= 0 or self.alpha <= 0:
            raise ValueError("iterations, forget_every, gamma and alpha must be positive")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0 (0 turns clipping off), got {self.clip_norm}")


def adaptive_ascent_weights(losses: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """w_i = N l_i^-p / sum_j l_j^-p for per-sample losses l (no gradient): they sum to N."""
    inverse = 1 / (losses.detach().clamp_min(1e-12) ** power)
    return len(losses) * inverse / inverse.sum()


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
        ce = F.cross_entropy(session.net(x), y, reduction="none")
        if self.config.weighting == "per-sample":
            return -alpha * (adaptive_ascent_weights(ce) * ce).mean()
        ce = ce.mean()
        return -alpha * ce / ce.detach().clamp_min(1e-6).sqrt()

    def retain_loss(self, session) -> torch.Tensor:
        x, y = session.random_batch(session.retain_x, session.retain_y)
        return F.cross_entropy(session.net(x), y)

    def run(self, session):
        cfg = self.config
        mask = self.saliency_mask(session)
        optimizer = session.optimizer
        for it in range(cfg.iterations):
            decay = 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
            if cfg.lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * decay
            if it % cfg.forget_every == 0:
                session.mask = mask
                session.step(self.forget_loss(session, cfg.alpha * decay), clip_norm=cfg.clip_norm or None)
            session.mask = mask if cfg.mask_retain else None
            session.step(self.retain_loss(session))
        return {}
