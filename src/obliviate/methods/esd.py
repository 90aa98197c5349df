"""ESD, Erased Stable Diffusion (Gandikota et al.): distil the frozen model's negatively guided
prediction into the conditional one,

    L = || f_theta(x_t, c, t) - [f*(x_t, c, t) - eta (f*(x_t, c, t) - f*(x_t, empty, t))] ||^2

where f is the UNet output. x_t comes from images the frozen model draws for the targets. The
combination has weights summing to one, so it is the same whether the UNet predicts noise or
velocity (both are affine in each other at fixed x_t and t).

``guide="anchor"`` is the attribute-erasure form (the reference code's ``--erase_from``): the
unconditional prediction is replaced by the prediction for the same prompt with the target
dropped (or replaced by the request's anchor), so only the target's direction is negated and the
rest of the prompt (colour, shape, ...) is kept. A model may draw the target exactly when its
word is dropped (shapes-t2i draws dotted for most prompts that name no texture); then the anchor
is the target, nothing is negated, and ``swap_anchors`` puts a random retained concept in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.text import TextEncoding
from .base import register_method
from ..training import TRAINABLE_PRESETS, GradientConfig
from .gradient import GradientMethod

ESD_VARIANTS = {"x": "xattn", "x-strict": "xattn-kv", "u": "non-xattn"}


@dataclass
class ESDConfig(GradientConfig):
    variant: str = field(default="x", metadata={
        "help": "x: cross-attention; x-strict: cross-attention keys/values; u: everything outside cross-attention"})
    negative_guidance: float = field(default=2.0, metadata={"help": "eta; 2 in the current reference code (= 1 in the old form)"})
    guide: str = field(default="unconditional", metadata={
        "help": "'unconditional' (ESD) or 'anchor': guide against the prompt without the target (attribute erasure)"})
    trainable: str = field(default="", metadata={"help": "override the variant's parameters (preset or regex)"})
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate"})

    def __post_init__(self):
        if self.variant not in ESD_VARIANTS:
            raise ValueError(f"Unknown ESD variant {self.variant!r}; choose one of {', '.join(ESD_VARIANTS)}.")
        if self.guide not in ("unconditional", "anchor"):
            raise ValueError(f"guide must be 'unconditional' or 'anchor', got {self.guide!r}")
        super().__post_init__()

    @property
    def trainable_regex(self) -> str:
        return TRAINABLE_PRESETS.get(self.trainable or ESD_VARIANTS[self.variant], self.trainable)


def esd_target(cond: torch.Tensor, uncond: torch.Tensor, eta: float) -> torch.Tensor:
    return cond - eta * (cond - uncond)


@register_method
class ESD(GradientMethod):
    name = "esd"
    description = "Erased Stable Diffusion: negative-guidance distillation (variants x, x-strict, u)"
    config_class = ESDConfig

    def loss(self, session) -> torch.Tensor:
        batch = session.forget_batch()
        cond = session.encode(batch.prompts)
        guides = batch.anchors if self.config.guide == "anchor" else [""] * len(batch.prompts)
        noisy, t = torch.cat([batch.noisy, batch.noisy]), torch.cat([batch.t, batch.t])
        with torch.no_grad():
            teacher_cond, teacher_uncond = session.teacher.predict(noisy, t, TextEncoding.cat([cond, session.encode(guides)])).chunk(2)
            target = esd_target(teacher_cond, teacher_uncond, self.config.negative_guidance)
        return (session.model.predict(batch.noisy, batch.t, cond) - target).pow(2).mean()
