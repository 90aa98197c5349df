"""SFR-on (Huang et al., 2024, "Unified gradient-based machine unlearning with remain geometry
enhancement") for diffusion.

Masked by the Fisher ratio, each iteration takes a fast forget step and then a slow retain step:

    mask     = 1[ F_forget / F_retain >= gamma ]      (diagonal Fisher of the denoising loss)
    forget   L_f = forget_weight * || f_theta(x_t, c_forget) - sg[f_theta(x_t, c_anchor)] ||^2  (masked)
    retain   L_r = retain_weight * L_DM(retained prompts)                                       (every step)

The retain step taken right after each forget step is the fast-slow update that stands in for
the retain loss's curvature; the forget step runs every ``forget_every`` iterations. Timesteps
come in antithetic pairs (t, T-1-t), as in the authors' DDPM code.

Under a subspace constraint (``gradproj``) the forget step keeps only the part of its gradient
that lies both on the mask and off the protected inputs, so it moves slower: on shapes-t2i-v2 it
does not erase striped in 40 steps at the default rate, and does at 2e-3 (README, "SFR-on").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..training import GradientConfig, fisher_ratio_mask
from .base import register_method
from .gradient import GradientMethod


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
    antithetic_timesteps: bool = field(default=True, metadata={"help": "pair every timestep t with T-1-t (the authors' DDPM code)"})

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
        return session.accumulate(lambda: session.denoising_loss(batch()), self.config.fisher_batches,
                                  squared=True, scale=1 / self.config.fisher_batches)

    def setup(self, session) -> None:
        forget = self._fisher(session, session.forget_batch)
        retain = self._fisher(session, session.retain_batch)
        self.forget_mask = fisher_ratio_mask(forget, retain, self.config.gamma)

    def loss(self, session) -> torch.Tensor:
        batch = session.forget_batch()
        with torch.no_grad():
            target = session.model.predict(batch.noisy, batch.t, session.encode(batch.anchors))
        return self.config.forget_weight * (session.model.predict(batch.noisy, batch.t, session.encode(batch.prompts)) - target).pow(2).mean()

    def stages(self, session):
        # the mask confines the forget step only: the retain step may move every weight
        if session.step % self.config.forget_every == 0:
            yield self.loss(session), self.forget_mask
        yield self.config.retain_weight * session.denoising_loss(session.retain_batch()), None
