"""Gradient ascent on the targets' denoising loss: the naive baseline every paper beats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import register_method
from ..training import GradientConfig
from .gradient import GradientMethod


@dataclass
class GAConfig(GradientConfig):
    trainable: str = field(default="all", metadata={"help": "parameters that train (preset or regex)"})
    steps: int = field(default=30, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate"})


@register_method
class GradientAscent(GradientMethod):
    name = "ga"
    description = "gradient ascent on the forget prompts' denoising loss (naive baseline; diverges if run long)"
    config_class = GAConfig
    uses_teacher = True  # only to draw the forget images

    def loss(self, session) -> torch.Tensor:
        return -session.denoising_loss(session.forget_batch())
