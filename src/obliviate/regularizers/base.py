"""Regularizers: add-ons to the shared gradient loop that any gradient method accepts.

A regularizer may add loss terms (``penalty``), change gradients before the optimizer step
(``transform_gradients``, e.g. projection or masking), act after the step (``after_step``),
rewrite the final edit (``finalize``, e.g. merging) and keep state across requests (``state``).
"""

from __future__ import annotations

import torch

from ..registry import Configurable, Registry


class Regularizer(Configurable):
    kind = "regularizer"

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


REGULARIZERS: Registry[Regularizer] = Registry("regularizer")
register_regularizer = REGULARIZERS.register
get_regularizer = REGULARIZERS.get
