"""L1-SP and L2-SP: penalise drift of the trained parameters from an anchor, either the
pretrained weights or the weights at the start of the current request (CUIG's default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .base import Regularizer, register_regularizer


@dataclass
class DriftConfig:
    weight: float = field(default=1000.0, metadata={"help": "penalty weight"})
    anchor: Literal["request", "pretrained"] = field(default="request", metadata={
        "help": "'request': weights at the start of this request; 'pretrained': the store's base model"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.anchor not in ("request", "pretrained"):
            raise ValueError(f"anchor must be 'request' or 'pretrained', got {self.anchor!r}")


class _DriftPenalty(Regularizer):
    config_class = DriftConfig
    power: int

    def setup(self, session) -> None:
        if self.config.anchor == "pretrained":
            self.anchor = {n: session.context.base_weights[f"unet.{n}"].to(p) for n, p in session.params.items()}
        else:
            self.anchor = {n: p.detach().clone() for n, p in session.params.items()}

    def penalty(self, session) -> torch.Tensor:
        total = sum(((p - self.anchor[n]).abs() ** self.power).sum() for n, p in session.params.items())
        count = sum(p.numel() for p in session.params.values())
        return self.config.weight * total / count


@register_regularizer
class L1SP(_DriftPenalty):
    name = "l1sp"
    description = "mean |theta - theta_anchor| penalty (drift towards the anchor weights stays small)"
    power = 1


@register_regularizer
class L2SP(_DriftPenalty):
    name = "l2sp"
    description = "mean (theta - theta_anchor)^2 penalty"
    power = 2
