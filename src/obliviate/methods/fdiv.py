"""f-divergence unlearning (Novello et al., 2025): the anchor objective generalised from MSE to
any f-divergence.

One reverse-diffusion step is Gaussian with a variance fixed by the schedule, so two models'
steps differ only in their means. For equal-variance Gaussians every f-divergence is a function
of the scaled squared mean gap  D = scale * mean((f_theta(x_t, c_target) - sg[f*(x_t, c_anchor)])^2):

    kl         D / 2                                   (the usual MSE objective, halved)
    hellinger  1 - exp(-D / 8)                         (squared Hellinger distance)
    alpha      (1 - exp(-a (1 - a) D / 2)) / (a (1 - a))   (Amari alpha; a -> 1 gives KL)
    js         log 2 - E_z[softplus(d z - d^2 / 2)],  d = sqrt(D), z ~ N(0, 1)
               (Jensen-Shannon reduces to one dimension along the mean gap; the expectation
               uses fixed Gauss-Hermite nodes, so it is exact to ~1e-6 and differentiable)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .base import register_method
from .ablation import ConceptAblation
from ..training import GradientConfig

DIVERGENCES = ("kl", "hellinger", "js", "alpha")
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(40)  # probabilists' Hermite: weight exp(-z^2/2)
_NODES = torch.tensor(_NODES)
_WEIGHTS = torch.tensor(_WEIGHTS / math.sqrt(2 * math.pi))


def f_divergence(gap: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """Divergence between two equal-variance Gaussians whose scaled squared mean gap is ``gap``."""
    if kind == "kl":
        return gap / 2
    if kind == "hellinger":
        return 1 - torch.exp(-gap / 8)
    if kind == "alpha":
        k = alpha * (1 - alpha)
        return (1 - torch.exp(-k * gap / 2)) / k
    if kind == "js":
        d = gap.clamp(min=0).sqrt()[..., None]
        z, w = _NODES.to(gap), _WEIGHTS.to(gap)
        return math.log(2) - (w * F.softplus(d * z - d ** 2 / 2)).sum(-1)
    raise ValueError(f"Unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}.")


@dataclass
class FDivConfig(GradientConfig):
    divergence: str = field(default="hellinger", metadata={"help": f"one of {', '.join(DIVERGENCES)}"})
    alpha: float = field(default=0.5, metadata={"help": "order of the alpha-divergence, in (0, 1)"})
    scale: float = field(default=10.0, metadata={"help": "multiplies the squared mean gap (sets where f bends)"})
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate"})

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"Unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        super().__post_init__()


@register_method
class FDivergence(ConceptAblation):
    """Concept ablation's objective with the MSE replaced by an f-divergence."""

    name = "fdiv"
    description = "anchor objective under an f-divergence (kl = MSE, hellinger, js, alpha)"
    config_class = FDivConfig

    def loss(self, session) -> torch.Tensor:
        prediction, target = self.prediction_and_target(session)
        gap = self.config.scale * (prediction - target).pow(2).flatten(1).mean(1)
        return f_divergence(gap, self.config.divergence, self.config.alpha).mean()
