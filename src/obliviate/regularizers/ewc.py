"""EWC: an elastic penalty weighted by the diagonal Fisher of the retained concepts' denoising
loss, (weight / 2) sum F (theta - theta_start)^2. The Fisher accumulates over requests in the
store's state, so every request protects what all earlier ones measured."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Regularizer, register_regularizer


@dataclass
class EWCConfig:
    weight: float = field(default=1e4, metadata={"help": "penalty weight"})
    batches: int = field(default=4, metadata={"help": "retain batches per Fisher estimate"})

    def __post_init__(self):
        if self.weight < 0 or self.batches <= 0:
            raise ValueError("weight must be >= 0 and batches positive")


@register_regularizer
class EWC(Regularizer):
    name = "ewc"
    description = "elastic weight consolidation with a diagonal Fisher accumulated across requests"
    config_class = EWCConfig

    def setup(self, session) -> None:
        fisher = session.accumulate(lambda: session.denoising_loss(session.retain_batch()), self.config.batches,
                                    squared=True, scale=1 / self.config.batches)
        saved = session.context.regularizer_states.get(self.name, {})
        previous = {k[len("fisher."):]: v for k, v in saved.items() if k.startswith("fisher.")}
        self.fisher = {n: f + previous.get(n, torch.zeros_like(f)).to(f) for n, f in fisher.items()}
        self.start = {n: p.detach().clone() for n, p in session.params.items()}

    def penalty(self, session) -> torch.Tensor:
        return self.config.weight / 2 * sum((self.fisher[n] * (p - self.start[n]) ** 2).sum() for n, p in session.params.items())

    def state(self) -> dict[str, torch.Tensor]:
        return {f"fisher.{n}": f.cpu() for n, f in self.fisher.items()}
