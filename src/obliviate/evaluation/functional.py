"""Functional cores of the metrics: plain functions on tensors, no state."""

from __future__ import annotations

import torch
from scipy.special import betaincinv


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    if len(target) == 0:
        return float("nan")
    return float((predicted == target).float().mean())


def unlearning_accuracy(predicted: torch.Tensor, forgotten: torch.Tensor) -> float:
    """UA: share of images made for a forgotten concept that the judge does *not* see as it."""
    return 1.0 - accuracy(predicted, forgotten)


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a share ``successes / trials``: the exact two-sided binomial
    interval, from Beta quantiles, lower = B^-1(a/2; k, n-k+1), upper = B^-1(1-a/2; k+1, n-k),
    with a = 1 - confidence (0 and 1 at the ends). It never undercovers, so a bar that the lower end
    clears holds at that confidence."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1 - confidence
    lower = float(betaincinv(successes, trials - successes + 1, alpha / 2)) if successes else 0.0
    upper = float(betaincinv(successes + 1, trials - successes, 1 - alpha / 2)) if successes < trials else 1.0
    return lower, upper


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    The symmetric form has the same trace as (S_a S_b)^1/2 and needs only symmetric
    eigendecompositions, which are stable for the rank-deficient covariances of small samples."""
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def mean_and_covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    mean = features.mean(0)
    centered = features - mean
    return mean, centered.T @ centered / max(1, len(features) - 1)
