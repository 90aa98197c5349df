"""Gradient accumulation without a weight update: saliency scores and Fisher estimates."""

from __future__ import annotations

from typing import Callable

import torch


def accumulate_gradients(params: dict[str, torch.nn.Parameter], loss: Callable[[], torch.Tensor], batches: int,
                         squared: bool = False, scale: float = 1.0,
                         on_backward: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """``scale * sum_b grad`` (``squared``: ``scale * sum_b grad^2``, a diagonal Fisher estimate)
    of ``loss()`` over ``batches`` calls, each call drawing its own batch. The weights are not
    changed and every ``.grad`` is cleared afterwards; a parameter the loss does not reach
    accumulates zeros."""
    if batches <= 0:
        raise ValueError(f"batches must be positive, got {batches}")
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(batches):
        for p in params.values():
            p.grad = None
        loss().backward()
        if on_backward is not None:
            on_backward()
        for n, p in params.items():
            if p.grad is not None:
                totals[n] += scale * (p.grad.pow(2) if squared else p.grad)
    for p in params.values():
        p.grad = None
    return totals
