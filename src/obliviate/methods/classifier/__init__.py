"""Unlearning methods for image classifiers, one file each, registered in the ``classifier``
family of the method registry."""

from __future__ import annotations

from . import fgoriu, ft, ga, rl, salun, scrub, sfron, ugclu, undo  # noqa: F401  (register the built-in methods)
