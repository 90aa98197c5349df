"""Labelled image datasets for classifiers, with fixed train/test splits.

``digits`` is scikit-learn's handwritten digits (1797 grey 8x8 images, shipped inside the
package, no download); ``shapes`` is the embedded world rendered with its shape as the label.
Both are built deterministically, so a training index names the same image on every machine.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0


@dataclass(frozen=True, eq=False)
class ImageDataset:
    name: str
    class_names: tuple[str, ...]
    train_x: torch.Tensor  # (N, C, H, W) float in [0, 1]
    train_y: torch.Tensor  # (N,) long
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_index(self, name: str) -> int:
        if name not in self.class_names:
            near = difflib.get_close_matches(name, self.class_names, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{self.name!r} has no class {name!r}.{hint} Classes: {', '.join(self.class_names)}.")
        return self.class_names.index(name)


def _stratified_split(y: np.ndarray, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        cut = int(round(len(idx) * test_share))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits() -> ImageDataset:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    train, test = _stratified_split(y, 0.3, SPLIT_SEED)
    y = torch.from_numpy(y)
    return ImageDataset("digits", tuple(str(d) for d in range(10)), x[train], y[train], x[test], y[test])


def _shapes(per_class: int = 1000) -> ImageDataset:
    from ..world import DEFAULT_ONTOLOGY
    from ..world.render import render, sample_scenes
    names = DEFAULT_ONTOLOGY.names("shape")
    shape = np.repeat(np.arange(len(names)), per_class)
    scenes = sample_scenes(len(shape), seed=2024, shape=shape)
    x = torch.from_numpy(render(scenes))
    train, test = _stratified_split(shape, 0.3, SPLIT_SEED)
    y = torch.from_numpy(shape)
    return ImageDataset("shapes", tuple(names), x[train], y[train], x[test], y[test])


DATASETS = {"digits": _digits, "shapes": _shapes}


@functools.cache
def load_dataset(name: str) -> ImageDataset:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; available: {', '.join(DATASETS)}.")
    return DATASETS[name]()
