"""Regularizers: add-ons to the shared gradient loop that any gradient method accepts.

A regularizer takes part in a request through five declared roles, and the loop combines them
by the composition contract of ``obliviate.training.contract``, whatever order the user lists
them in:

- ``constraints``: masks and protected input subspaces per parameter; every declarer's
  constraints are intersected into one projector per parameter, applied to each gradient and to
  the request's accumulated update after every optimizer step (exact under Adam);
- ``penalty``: a loss term; penalties add;
- ``rectify``: rewrites the step's summed gradient after backward, before the constraints project
  it (a term whose gradient depends on everyone else's, like AEGIS's rectified retain term); at
  most one regularizer of a request may do so;
- ``finalize``: rewrites the finished edit (merging); at most one regularizer of a request may
  do so, it runs after training, and the constraints are applied to its result again. That
  regularizer may also name the weights training starts from (``start_weights``: CUIG's
  independent task vectors train from the pretrained model);
- ``state``: tensors kept in the store for later requests.
"""

from __future__ import annotations

import torch

from ..registry import Configurable, Registry
from ..training import ParameterConstraint, TrainingSession


class Regularizer(Configurable):
    kind = "regularizer"
    rewrites_edit: bool = False  # True for regularizers that override ``finalize``
    rewrites_gradient: bool = False  # True for regularizers that override ``rectify``

    def setup(self, session: TrainingSession) -> None:
        """Called once before the first step with the training session."""

    def constraints(self, session: TrainingSession) -> dict[str, ParameterConstraint]:
        """``{parameter name: constraint}`` for parameters of ``session.params``; read once after
        every ``setup``."""
        return {}

    def penalty(self, session: TrainingSession) -> torch.Tensor | None:
        return None

    def rectify(self, session: TrainingSession) -> None:
        """Rewrite the trained parameters' gradients (``session.params[n].grad``: this step's loss
        and penalties, ``None`` where they do not reach) in place."""

    def start_weights(self, context) -> dict[str, torch.Tensor] | None:
        """The model's tensors to train the request from (``None``: the store's current model);
        only a regularizer that rewrites the edit may choose, since only it can turn the trained
        delta back into an edit of the current model."""
        return None

    def finalize(self, session: TrainingSession, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return deltas

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to keep for later requests (saved in the store under this regularizer's name)."""
        return {}


REGULARIZERS: Registry[Regularizer] = Registry("regularizer")
register_regularizer = REGULARIZERS.register
get_regularizer = REGULARIZERS.get


def check_composition(names: list[str]) -> None:
    """Refuse regularizer lists the contract cannot combine: a name twice (their states would
    share one namespace in the store), or two that rewrite the edit or two that rewrite the
    gradient (which one's result holds would depend on the order)."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Regularizer {repeated[0]!r} is listed twice; give it once, with all its options "
                         f"(e.g. --regularizer {repeated[0]}:key=value,key=value).")
    for role, what in (("rewrites_edit", "the finished edit"), ("rewrites_gradient", "each step's gradient")):
        rewriting = [n for n in names if getattr(get_regularizer(n), role)]
        if len(rewriting) > 1:
            raise ValueError(f"Regularizers {' and '.join(rewriting)} both rewrite {what}, and the result "
                             "would depend on which runs last; keep one of them.")
