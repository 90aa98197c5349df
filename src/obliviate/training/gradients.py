"""Gradient accumulation without a weight update (saliency scores, Fisher estimates), and the
rectification of a retain gradient that conflicts with the rest of a step's gradient."""

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


def rectified_retain_gradient(erase: dict[str, torch.Tensor], retain: dict[str, torch.Tensor],
                              omega: float) -> dict[str, torch.Tensor]:
    """AEGIS's conflict-gated rectification of a retain gradient g_r beside the rest of the step's
    gradient g_e (inner products over every parameter together):

        g_r                                                 if <g_e, g_r> >= 0
        lambda g_r,  lambda = -omega <g_e, g_r> / |g_r|^2   otherwise

    so that in a conflict the step's gradient g_e + lambda g_r has <., g_r> = (1 - omega) <g_e, g_r>:
    at omega = 1 a descent step no longer moves against the retain term to first order, at
    omega = 0 the retain term gives way to the erasure."""
    if not 0 <= omega <= 1:
        raise ValueError(f"omega must lie in [0, 1], got {omega}")
    # one device sync for the two sums over every parameter, not one per parameter (this runs every step)
    inner, norm = map(float, torch.stack([
        sum((erase[n].double() * g.double()).sum() for n, g in retain.items()),
        sum(g.double().pow(2).sum() for g in retain.values())]))
    if inner >= 0:
        return retain
    scale = -omega * inner / norm
    return {n: scale * g for n, g in retain.items()}
