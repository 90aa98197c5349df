"""Fine-tuning on the retained data only (the forget set is simply left out), relying on
catastrophic forgetting: the cheapest baseline of the classification unlearning literature."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.nn import functional as F

from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class FineTuneConfig(ClassifierConfig):
    epochs: int = field(default=3, metadata={"help": "passes over the retained data"})


@register_method
class FineTune(ClassifierMethod):
    name = "ft"
    description = "fine-tune on the retained data only"
    config_class = FineTuneConfig

    def run(self, session):
        for _ in range(self.config.epochs):
            for x, y in session.batches(session.retain_x, session.retain_y):
                session.step(F.cross_entropy(session.net(x), y))
