"""SalUn (Fan et al., ICLR 2024) for diffusion: train only the salient weights, those with the
largest forget-loss gradient magnitude, towards a random other concept, with a retain term.

    mask = 1[ |grad_theta L_f| in the global top `mask_ratio` fraction ]
    L    = || f_theta(x_t, c_forget) - sg[f_theta(x_t, c_random)] ||^2 + retain_weight * L_DM(retained)

L_f is the denoising loss on the forget images; c_random is the forget prompt with a random other
concept of the target's domain in the target's place, or the request's anchor when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..training import GradientConfig, ParameterConstraint, top_fraction_mask
from .base import register_method
from .gradient import GradientMethod


@dataclass
class SalUnConfig(GradientConfig):
    mask_ratio: float = field(default=0.5, metadata={"help": "fraction of trainable weights in the saliency mask"})
    retain_weight: float = field(default=0.5, metadata={"help": "alpha, weight of the retain denoising loss"})
    saliency_batches: int = field(default=4, metadata={"help": "batches that estimate the forget gradient"})
    trainable: str = field(default="all", metadata={"help": "parameters that may train (preset or regex)"})
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=2e-4, metadata={"help": "Adam learning rate"})

    def __post_init__(self):
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must lie in (0, 1], got {self.mask_ratio}")
        if self.retain_weight < 0 or self.saliency_batches <= 0:
            raise ValueError("retain_weight must be >= 0 and saliency_batches positive")
        super().__post_init__()


@register_method
class SalUn(GradientMethod):
    name = "salun"
    description = "saliency-masked random-concept relabelling with a retain term (SalUn)"
    config_class = SalUnConfig
    random_anchors = True

    def setup(self, session) -> None:
        gradients = session.accumulate(lambda: session.denoising_loss(session.forget_batch()), self.config.saliency_batches)
        self.mask = top_fraction_mask({n: g.abs() for n, g in gradients.items()}, self.config.mask_ratio)

    def constraints(self, session) -> dict[str, ParameterConstraint]:
        return {n: ParameterConstraint(self.name, mask=m) for n, m in self.mask.items()}

    def loss(self, session) -> torch.Tensor:
        batch = session.forget_batch()
        with torch.no_grad():
            target = session.model.predict(batch.noisy, batch.t, session.encode(batch.anchors))
        forget = (session.model.predict(batch.noisy, batch.t, session.encode(batch.prompts)) - target).pow(2).mean()
        return forget + self.config.retain_weight * session.denoising_loss(session.retain_batch())
