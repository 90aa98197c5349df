"""Parameter masks: which weights a request may move."""

from __future__ import annotations

import torch

# Diagonal Fisher estimates are sums of squared gradients; a weight no batch touched has exactly
# 0 in both, and 0/0 must read as "not salient" for the ratio test, so both get this floor.
FISHER_FLOOR = 1e-20


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """1 for the globally largest ``fraction`` of all scores, 0 elsewhere (ties at the threshold
    are kept, so the share can exceed ``fraction`` slightly)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = max(1, int(round(fraction * flat.numel())))
    threshold = torch.topk(flat, keep).values.min()
    return {n: (s >= threshold).to(s.dtype) for n, s in scores.items()}


def fisher_ratio_mask(forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor], gamma: float) -> dict[str, torch.Tensor]:
    """SFR-on's mask 1[F_forget / F_retain >= gamma] from two diagonal Fisher estimates."""
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return {n: ((forget[n] + FISHER_FLOOR) / (retain[n] + FISHER_FLOOR) >= gamma).to(forget[n].dtype) for n in forget}
