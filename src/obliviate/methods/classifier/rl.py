"""Random labels: train on the forget set relabelled with random known classes together with the
retained data under their true labels (the RL baseline of SalUn's code)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class RandomLabelConfig(ClassifierConfig):
    epochs: int = field(default=2, metadata={"help": "passes over forget and retained data"})


def relabel_and_retain_epoch(session) -> None:
    """One shuffled pass over the forget set (fresh random labels) joined with the retained data."""
    x = torch.cat([session.forget_x, session.retain_x])
    y = torch.cat([session.random_labels(session.forget_y), session.retain_y])
    for bx, by in session.batches(x, y):
        session.step(F.cross_entropy(session.net(bx), by))


@register_method
class RandomLabel(ClassifierMethod):
    name = "rl"
    description = "random labels on the forget set, true labels on the retained data"
    config_class = RandomLabelConfig

    def run(self, session):
        for _ in range(self.config.epochs):
            relabel_and_retain_epoch(session)
