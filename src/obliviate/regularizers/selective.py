"""SelFT, selective fine-tuning: score every trainable weight by |theta * grad| of the method's
own loss at the start of the request and train only the global top ``fraction``. The choice is
a mask constraint, so it composes with any other constraint by intersection."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training import ParameterConstraint, top_fraction_mask
from .base import Regularizer, register_regularizer


@dataclass
class SelectiveConfig:
    fraction: float = field(default=0.1, metadata={"help": "share of trainable weights that may move"})
    batches: int = field(default=2, metadata={"help": "batches that estimate the gradient"})

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")
        if self.batches <= 0:
            raise ValueError("batches must be positive")


@register_regularizer
class SelectiveFineTuning(Regularizer):
    name = "selft"
    description = "train only the top-k weights by |theta * grad| (SelFT)"
    config_class = SelectiveConfig

    def setup(self, session) -> None:
        grads = session.accumulate(lambda: session.objective(session), self.config.batches)
        scores = {n: (p.detach() * grads[n]).abs() for n, p in session.params.items()}
        self.mask = top_fraction_mask(scores, self.config.fraction)

    def constraints(self, session) -> dict[str, ParameterConstraint]:
        return {n: ParameterConstraint(self.name, mask=m) for n, m in self.mask.items()}
