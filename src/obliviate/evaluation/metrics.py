"""Metrics as update/compute/reset objects, in the manner of torchmetrics, over ``functional``.

State is kept as sums, so results are exact however the data is split into batches.
"""

from __future__ import annotations

import torch

from . import functional as F


class Metric:
    higher_is_better: bool = True

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def __init__(self):
        self.reset()


class Accuracy(Metric):
    """Share of predictions equal to their target (IRA and CRA are accuracies on retained concepts)."""

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        if predicted.shape != target.shape:
            raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
        self.correct += int((predicted == target).sum())
        self.total += len(target)

    def compute(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def _successes(self) -> int:
        return self.correct

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Exact binomial interval of ``compute()`` over the ``total`` images seen so far."""
        return F.binomial_interval(self._successes(), self.total, confidence)


class UnlearningAccuracy(Accuracy):
    """UA: share of images for a forgotten concept that the judge does not classify as it."""

    def compute(self) -> float:
        return 1.0 - super().compute() if self.total else float("nan")

    def _successes(self) -> int:
        return self.total - self.correct


class FrechetDistance(Metric):
    """Fréchet distance between two feature sets: ``update(features, real=True|False)``."""

    higher_is_better = False

    def __init__(self, num_features: int):
        self.num_features = num_features
        super().__init__()

    def reset(self) -> None:
        d = self.num_features
        self.sums = {r: torch.zeros(d, dtype=torch.float64) for r in (True, False)}
        self.outer = {r: torch.zeros(d, d, dtype=torch.float64) for r in (True, False)}
        self.counts = {True: 0, False: 0}

    def update(self, features: torch.Tensor, real: bool) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(features.shape)}")
        f = features.detach().double().cpu()
        self.sums[real] += f.sum(0)
        self.outer[real] += f.T @ f
        self.counts[real] += len(f)

    def _moments(self, real: bool):
        n = self.counts[real]
        if n < 2:
            raise ValueError(f"FrechetDistance needs at least 2 {'real' if real else 'generated'} samples, got {n}")
        mean = self.sums[real] / n
        cov = (self.outer[real] - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> float:
        return F.frechet_distance(*self._moments(True), *self._moments(False))


class CLIPScore(Metric):
    """Mean CLIP score of image-text pairs, ``100 * max(cos(image, text), 0)`` (Hessel et al.;
    torchmetrics' definition): ``update(image_embeddings, text_embeddings)``, row i with row i."""

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> None:
        if image_embeddings.shape != text_embeddings.shape:
            raise ValueError(f"image {tuple(image_embeddings.shape)} and text {tuple(text_embeddings.shape)} "
                             "embeddings differ in shape; pass one text per image")
        cosine = torch.nn.functional.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1)
        self.total += float((100 * cosine.clamp(0, 1)).sum())  # rounding can put a cosine past 1
        self.count += len(cosine)

    def compute(self) -> float:
        return self.total / self.count if self.count else float("nan")
