"""Gradient ascent on the forget set's cross-entropy: the naive baseline. Without a retain term it
destroys the retained classes too once the forget loss grows, so steps are few and small."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.nn import functional as F

from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class GradientAscentConfig(ClassifierConfig):
    epochs: int = field(default=2, metadata={"help": "passes over the forget set"})
    learning_rate: float = field(default=2e-3, metadata={"help": "SGD learning rate"})


@register_method
class GradientAscent(ClassifierMethod):
    name = "ga"
    description = "gradient ascent on the forget set's cross-entropy"
    config_class = GradientAscentConfig

    def run(self, session):
        for _ in range(self.config.epochs):
            for x, y in session.batches(session.forget_x, session.forget_y):
                session.step(-F.cross_entropy(session.net(x), y))
