"""What every unlearning method shares: the ``Edit`` it produces and the ``UnlearningMethod``
interface with its registry (the ``UnlearningContext`` it reads lives beside ``Request``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..registry import Configurable, Registry
from ..request import UnlearningContext
from ..tensors import EditedTensors


@dataclass(frozen=True)
class Edit:
    """A frozen record of what one request changed.

    ``deltas`` are added to existing model tensors (named as in ``model.state_tensors()``);
    ``factors`` are low-rank deltas kept as (up, down), added as ``up @ down`` (an adapter's
    update: a rank-r change to a d_out x d_in weight stores r d_out numbers, plus r d_in for
    each distinct down-projection);
    ``additions`` are new tensors the request introduces (e.g. a text-space transform). Applying
    the same edits in the same order to the same base always gives bit-identical weights.
    """

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    additions: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        both = [k for k in self.factors if k in self.deltas]
        if both:
            raise ValueError(f"Edit changes {both[0]!r} both as a dense delta and as low-rank factors; give one.")

    def apply(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self.view(weights))

    def view(self, weights: Mapping[str, torch.Tensor]) -> "EditedTensors":
        """``apply``'s result, each tensor computed when read: weights stream through an edit
        (into a hash, into a file) without a second copy of the model in memory."""
        missing = [k for k in (*self.deltas, *self.factors) if k not in weights]
        if missing:
            raise KeyError(f"Edit changes tensors the model does not have: {missing[:3]}")
        clash = [k for k in self.additions if k in weights]
        if clash:
            raise KeyError(f"Edit adds tensors the model already has: {clash[:3]}")
        return EditedTensors(weights, _Deltas(self.deltas, self.factors), self.additions)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors for one file. Layers that share a down-projection (an adapter's
        rows, read by every layer it adapts) store it once: ``down/<i>`` and ``up/<i>/<name>``."""
        downs: list[torch.Tensor] = []
        tensors = {**{f"delta/{k}": v for k, v in self.deltas.items()}, **{f"add/{k}": v for k, v in self.additions.items()}}
        for name, (up, down) in self.factors.items():
            index = next((i for i, d in enumerate(downs) if d.shape == down.shape and torch.equal(d, down)), len(downs))
            if index == len(downs):
                downs.append(down)
                tensors[f"down/{index}"] = down
            tensors[f"up/{index}/{name}"] = up
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Edit":
        factors = {}
        for key, up in tensors.items():
            if key.startswith("up/"):
                index, name = key[3:].split("/", 1)
                factors[name] = (up, tensors[f"down/{index}"])
        return cls({k[6:]: v for k, v in tensors.items() if k.startswith("delta/")},
                   {k[4:]: v for k, v in tensors.items() if k.startswith("add/")}, factors)

    @classmethod
    def between(cls, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> "Edit":
        """The delta edit from ``before`` to ``after`` over the tensors that changed."""
        return cls({k: (after[k] - before[k]).detach().cpu() for k in after if not torch.equal(after[k], before[k])})


class _Deltas(Mapping):
    """Dense deltas and low-rank factors as one mapping of deltas; ``up @ down`` is computed when
    read, by the same operation each time, so replay stays bit-exact."""

    def __init__(self, dense: Mapping[str, torch.Tensor], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
        self.dense, self.factors = dense, factors

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.factors:
            up, down = self.factors[name]
            return up @ down
        return self.dense[name]

    def __iter__(self):
        yield from self.dense
        yield from self.factors

    def __len__(self) -> int:
        return len(self.dense) + len(self.factors)


@dataclass
class MethodResult:
    edit: Edit
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    regularizer_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class UnlearningMethod(Configurable, ABC):
    """Subclasses set ``name``, ``description`` and ``config_class``, implement ``unlearn``, and
    are registered with ``@register_method``."""

    kind = "method"
    family: str = "t2i"  # the model family it edits: "t2i" or "classifier"
    accepts_regularizers: bool = False  # the shared diffusion training loop runs them; nothing else does

    def check_parameters(self, names: Sequence[str]) -> None:
        """Raise ValueError if this configuration selects none of the model's parameters
        ``names``; `request add` runs it so that a typo fails before any work is done."""

    @abstractmethod
    def unlearn(self, model, request, context: UnlearningContext) -> MethodResult:
        """Return the edit that makes ``model`` forget ``request.targets``; do not keep the
        model modified (the store applies the edit)."""


# One registry per model family, so a classifier's ``ga`` and a diffusion model's ``ga`` coexist.
METHODS: dict[str, Registry[UnlearningMethod]] = {
    "t2i": Registry("text-to-image method"), "classifier": Registry("classifier method")}


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    if cls.family not in METHODS:
        raise ValueError(f"{cls.__name__}.family is {cls.family!r}; expected one of {', '.join(METHODS)}.")
    return METHODS[cls.family].register(cls)


def get_method(name: str, family: str = "t2i") -> type[UnlearningMethod]:
    return METHODS[family].get(name)
