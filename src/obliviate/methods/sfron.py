"""SFR-on (Huang et al., 2024, "Unified gradient-based machine unlearning with remain geometry
enhancement") for diffusion.

Masked by the Fisher ratio, each iteration takes a fast forget step and then a slow retain step:

    mask     = 1[ F_forget / F_retain >= gamma ]      (diagonal Fisher of the denoising loss)
    forget   L_f = forget_weight * || f_theta(x_t, c_forget) - sg[f_theta(x_t, c_anchor)] ||^2  (masked)
    retain   L_r = retain_weight * L_DM(retained prompts)                                       (every step)

The retain step taken right after each forget step is the fast-slow update that stands in for
the retain loss's curvature; the forget step runs every ``forget_every`` iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import register_method
from .training import GradientConfig, GradientMethod


@dataclass
class SFRonConfig(GradientConfig):
    gamma: float = field(default=1.0, metadata={"help": "Fisher-ratio threshold of the mask (lambda in the paper)"})
    forget_weight: float = field(default=1.0, metadata={"help": "weight of the forget loss"})
    retain_weight: float = field(default=1.0, metadata={"help": "weight of the retain loss"})
    forget_every: int = field(default=1, metadata={"help": "take a forget step every this many iterations"})
    fisher_batches: int = field(default=4, metadata={"help": "batches per Fisher estimate"})
    trainable: str = field(default="xattn", metadata={"help": "parameters that may train (preset or regex)"})
    steps: int = field(default=40, metadata={"help": "iterations"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate"})

    def __post_init__(self):
        if self.gamma <= 0 or self.forget_every <= 0 or self.fisher_batches <= 0:
            raise ValueError("gamma, forget_every and fisher_batches must be positive")
        super().__post_init__()


@register_method
class SFRon(GradientMethod):
    name = "sfron"
    description = "SFR-on: Fisher-ratio mask, alternating forget and retain steps (remain geometry)"
    config_class = SFRonConfig

    def _fisher(self, session, batch) -> dict[str, torch.Tensor]:
        fisher = {n: torch.zeros_like(p) for n, p in session.params.items()}
        for _ in range(self.config.fisher_batches):
            session.model.unet.zero_grad(set_to_none=True)
            self.denoising_loss(session, *batch()).backward()
            session.counter.backward += 1
            for n, p in session.params.items():
                fisher[n] += p.grad.pow(2) / self.config.fisher_batches
        session.model.unet.zero_grad(set_to_none=True)
        return fisher

    def setup(self, session) -> None:
        forget = self._fisher(session, lambda: self.forget_denoising_batch(session))
        retain = self._fisher(session, lambda: self.retain_batch(session))
        self.gradient_mask = {n: ((forget[n] + 1e-15) / (retain[n] + 1e-15) >= self.config.gamma).to(forget[n].dtype)
                              for n in forget}

    def loss(self, session) -> torch.Tensor:
        prompts, anchors, _, noisy, t, _ = self.forget_batch(session)
        with torch.no_grad():
            target = session.model.predict(noisy, t, session.encode(anchors))
        return self.config.forget_weight * (session.model.predict(noisy, t, session.encode(prompts)) - target).pow(2).mean()

    def stages(self, session):
        if session.step % self.config.forget_every == 0:
            yield self.loss(session), self.gradient_mask
        yield self.config.retain_weight * self.denoising_loss(session, *self.retain_batch(session)), None
