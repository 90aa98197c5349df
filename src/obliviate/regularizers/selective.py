"""SelFT, selective fine-tuning: score every trainable weight by |theta * grad| of the method's
own loss at the start of the request and train only the global top ``fraction``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
        from ..methods.salun import top_fraction_mask

        grads = {n: torch.zeros_like(p) for n, p in session.params.items()}
        for _ in range(self.config.batches):
            session.model.unet.zero_grad(set_to_none=True)
            session.method.loss(session).backward()
            session.counter.backward += 1
            for n, p in session.params.items():
                if p.grad is not None:
                    grads[n] += p.grad
        session.model.unet.zero_grad(set_to_none=True)
        scores = {n: (p.detach() * grads[n]).abs() for n, p in session.params.items()}
        self.mask = top_fraction_mask(scores, self.config.fraction)
        self.start = {n: p.detach().clone() for n, p in session.params.items()}

    def transform_gradients(self, session) -> None:
        for n, p in session.params.items():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])

    @torch.no_grad()
    def after_step(self, session) -> None:
        # Adam's momentum from earlier masked-in steps could still move a weight; pin them.
        for n, p in session.params.items():
            p.copy_(torch.where(self.mask[n].bool(), p, self.start[n]))
