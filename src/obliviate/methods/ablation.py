"""Concept ablation (Kumari et al., model-based variant): make the model's prediction for a
target prompt match the frozen model's prediction for the anchor prompt, on images of the
anchor, so the target now draws the anchor:

    L = || f_theta(x_t, c_target, t) - sg[f*(x_t, c_anchor, t)] ||^2,   x_0 ~ anchor images

Without an explicit anchor, the anchor prompt is the target prompt with the target words
dropped (``a striped red triangle`` -> ``a red triangle``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import register_method
from ..training import Batch, GradientConfig
from .gradient import GradientMethod


@dataclass
class AblationConfig(GradientConfig):
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate"})


@register_method
class ConceptAblation(GradientMethod):
    name = "ablation"
    description = "concept ablation: target prompts reproduce the frozen model's anchor predictions"
    config_class = AblationConfig

    def image_prompts(self, session):
        return session.anchor_prompts

    def prediction_and_target(self, session) -> tuple[torch.Tensor, torch.Tensor, Batch]:
        """f_theta(x_t, c_target) and sg[f*(x_t, c_anchor)] on a fresh batch, and the batch."""
        batch = session.forget_batch()
        with torch.no_grad():
            target = session.teacher.predict(batch.noisy, batch.t, session.encode(batch.anchors))
        return session.model.predict(batch.noisy, batch.t, session.encode(batch.prompts)), target, batch

    def loss(self, session) -> torch.Tensor:
        prediction, target, _ = self.prediction_and_target(session)
        return (prediction - target).pow(2).mean()
