"""Regularizers for continual unlearning, registered by name."""

from __future__ import annotations

import difflib

from .base import REGULARIZERS, Regularizer, register_regularizer
from . import drift, ewc, merge, projection, selective  # noqa: F401,E402  (register the built-ins)


def get_regularizer(name: str) -> type[Regularizer]:
    if name not in REGULARIZERS:
        near = difflib.get_close_matches(name, REGULARIZERS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"Unknown regularizer {name!r}.{hint} Available: {', '.join(sorted(REGULARIZERS)) or 'none'}.")
    return REGULARIZERS[name]


__all__ = ["REGULARIZERS", "Regularizer", "get_regularizer", "register_regularizer"]
