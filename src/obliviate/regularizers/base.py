"""Regularizers: add-ons to the shared gradient loop that any gradient method accepts.

A regularizer may add loss terms (``penalty``), change gradients before the optimizer step
(``transform_gradients``, e.g. projection or masking), act after the step (``after_step``),
rewrite the final edit (``finalize``, e.g. merging) and keep state across requests (``state``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch


class Regularizer:
    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()

    def setup(self, session) -> None:
        """Called once before the first step with the training session."""

    def penalty(self, session) -> torch.Tensor | None:
        return None

    def transform_gradients(self, session) -> None:
        """Modify ``p.grad`` of ``session.params`` in place."""

    def after_step(self, session) -> None:
        pass

    def finalize(self, session, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return deltas

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to keep for later requests (saved in the store under this regularizer's name)."""
        return {}


REGULARIZERS: dict[str, type[Regularizer]] = {}


def register_regularizer(cls: type[Regularizer]) -> type[Regularizer]:
    if cls.name in REGULARIZERS:
        raise ValueError(f"Regularizer {cls.name!r} is registered twice.")
    if not dataclasses.is_dataclass(cls.config_class):
        raise TypeError(f"{cls.__name__}.config_class must be a dataclass")
    REGULARIZERS[cls.name] = cls
    return cls
