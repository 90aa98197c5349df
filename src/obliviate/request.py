"""A deletion request: what to forget, how, and with which protection; and the context a method
applies it in. Requests are data: stored in the ledger as JSON and never edited after they are
added."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from .config import SEED_RANGE, check_number
from .world.targets import TargetSource


@dataclass(frozen=True)
class RegularizerSpec:
    name: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """``targets`` are concept terms (a concept, a supertype, or a combination such as
    ``"striped triangle"`` in the embedded world; any text for Stable Diffusion). ``anchor`` is
    what the targets should map to instead (method-dependent default when ``None``)."""

    targets: tuple[str, ...]
    method: str
    method_config: dict = field(default_factory=dict)
    anchor: str | None = None
    regularizers: tuple[RegularizerSpec, ...] = ()
    seed: int = 0
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self):
        if not self.targets or any(not t.strip() for t in self.targets):
            raise ValueError("A request needs at least one non-empty target concept, e.g. `obliviate request add STORE striped`.")
        if not self.method:
            raise ValueError("A request needs a method; `obliviate methods` lists them.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"A request's seed must be an integer, got {self.seed!r}.")
        check_number("seed", self.seed, SEED_RANGE)

    def to_json(self) -> str:
        return json.dumps({"targets": list(self.targets), "method": self.method, "method_config": self.method_config,
                           "anchor": self.anchor, "seed": self.seed, "created_at": self.created_at,
                           "regularizers": [{"name": r.name, "config": r.config} for r in self.regularizers]},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Request":
        data = json.loads(text)
        return cls(targets=tuple(data["targets"]), method=data["method"], method_config=data["method_config"],
                   anchor=data["anchor"], seed=data["seed"], created_at=data["created_at"],
                   regularizers=tuple(RegularizerSpec(r["name"], r["config"]) for r in data["regularizers"]))

    @property
    def label(self) -> str:
        """The targets for messages; long lists (sample deletions) are summarised."""
        if len(self.targets) <= 4:
            return " + ".join(self.targets)
        return f"{len(self.targets)} targets ({', '.join(self.targets[:3])}, ...)"


@dataclass
class UnlearningContext:
    """What a method may read besides the model and the request.

    ``state`` is this method's own state left by earlier requests (running statistics,
    subspaces); ``regularizer_states`` holds each regularizer's, by name. ``forgotten`` lists the
    targets of every request already in the model.
    """

    prompts: TargetSource  # WorldPrompts or FreeTextPrompts (text to image), DataTargets (classifiers)
    base_weights: Mapping[str, torch.Tensor]  # read from disk when used: index it, do not copy it whole
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    regularizer_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    forgotten: tuple[str, ...] = ()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable[..., None] | None = None  # progress(n=1, **fields)
