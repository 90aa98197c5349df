"""What a classifier request may name: a class (``7``, ``triangle``) or one training sample
(``sample:123``, an index into the dataset's fixed training split)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ImageDataset, load_dataset

SAMPLE_PREFIX = "sample:"


@dataclass(frozen=True)
class DataSplit:
    """Training and test data divided by what has been forgotten so far."""

    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor
    test_x: torch.Tensor  # test images of classes still known
    test_y: torch.Tensor
    forget_test_x: torch.Tensor  # test images of forgotten classes (empty for sample deletion)
    forget_test_y: torch.Tensor
    forget_index: torch.Tensor  # training indices in the forget set


@dataclass(frozen=True)
class DataTargets:
    dataset_name: str

    @property
    def dataset(self) -> ImageDataset:
        return load_dataset(self.dataset_name)

    def validate(self, targets: tuple[str, ...], anchor: str | None) -> None:
        if anchor is not None:
            raise ValueError("Classifier requests take no anchor: the method decides where forgotten data goes. "
                             "Drop --anchor.")
        if len(set(self.classes(targets))) == self.dataset.num_classes:
            raise ValueError(f"The request names all {self.dataset.num_classes} classes; a classifier must keep at least one.")
        self.samples(targets)
        if len(set(targets)) != len(targets):
            raise ValueError(f"A target is named twice in {', '.join(targets)}.")

    def classes(self, targets: tuple[str, ...]) -> list[int]:
        return [self.dataset.class_index(t) for t in targets if not t.startswith(SAMPLE_PREFIX)]

    def samples(self, targets: tuple[str, ...]) -> list[int]:
        n = len(self.dataset.train_y)
        out = []
        for t in targets:
            if t.startswith(SAMPLE_PREFIX):
                text = t[len(SAMPLE_PREFIX):]
                if not text.isdigit() or int(text) >= n:
                    raise ValueError(f"{t!r} is not a training sample: expected sample:<index> with 0 <= index < {n}.")
                out.append(int(text))
        return out

    def split(self, forgotten: tuple[str, ...]) -> DataSplit:
        data = self.dataset
        classes = torch.tensor(self.classes(forgotten), dtype=torch.long)
        forget = torch.isin(data.train_y, classes)
        forget[self.samples(forgotten)] = True
        test_forgotten = torch.isin(data.test_y, classes)
        return DataSplit(data.train_x[forget], data.train_y[forget], data.train_x[~forget], data.train_y[~forget],
                         data.test_x[~test_forgotten], data.test_y[~test_forgotten],
                         data.test_x[test_forgotten], data.test_y[test_forgotten], forget.nonzero().flatten())
