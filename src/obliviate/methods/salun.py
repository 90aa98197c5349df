"""SalUn (Fan et al., ICLR 2024) for diffusion: train only the salient weights, those with the
largest forget-loss gradient magnitude, towards a random other concept, with a retain term.

    mask = 1[ |grad_theta L_f| in the global top `mask_ratio` fraction ]
    L    = || f_theta(x_t, c_forget) - sg[f_theta(x_t, c_random)] ||^2 + retain_weight * L_DM(retained)

L_f is the denoising loss on the forget images; the random target is a random other concept of
the target's domain, or the request's anchor when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import register_method
from .training import GradientConfig, GradientMethod


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


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """1 for the globally largest ``fraction`` of all scores, 0 elsewhere (ties broken by order)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = max(1, int(round(fraction * flat.numel())))
    threshold = torch.topk(flat, keep).values.min()
    return {n: (s >= threshold).to(s.dtype) for n, s in scores.items()}


@register_method
class SalUn(GradientMethod):
    name = "salun"
    description = "saliency-masked random-concept relabelling with a retain term (SalUn)"
    config_class = SalUnConfig

    def setup(self, session) -> None:
        if session.request.anchor is None:
            pairs = session.context.prompts.random_anchor_pairs(tuple(session.request.targets), len(session.forget_prompts), session.rng)
            session.anchor_prompts = [p.anchor for p in pairs]
        gradients = {n: torch.zeros_like(p) for n, p in session.params.items()}
        for _ in range(self.config.saliency_batches):
            session.model.unet.zero_grad(set_to_none=True)
            self.denoising_loss(session, *self.forget_denoising_batch(session)).backward()
            session.counter.backward += 1
            for n, p in session.params.items():
                gradients[n] += p.grad
        session.model.unet.zero_grad(set_to_none=True)
        self.gradient_mask = top_fraction_mask({n: g.abs() for n, g in gradients.items()}, self.config.mask_ratio)

    def loss(self, session) -> torch.Tensor:
        prompts, anchors, _, noisy, t, _ = self.forget_batch(session)
        with torch.no_grad():
            target = session.model.predict(noisy, t, session.encode(anchors))
        forget = (session.model.predict(noisy, t, session.encode(prompts)) - target).pow(2).mean()
        return forget + self.config.retain_weight * self.denoising_loss(session, *self.retain_batch(session))
