"""Unlearning methods, one file each, registered by lowercase name."""

from __future__ import annotations

from .base import METHODS, Edit, MethodResult, UnlearningContext, UnlearningMethod, get_method, register_method
from . import ablation, erasepro, esd, fdiv, ga, lw2g, safegen, salun, sdwv, sfron, suplora, uce, undo  # noqa: F401,E402  (register the built-in methods)
from . import classifier  # noqa: F401,E402


def list_methods(family: str = "t2i") -> dict[str, str]:
    return {name: cls.description for name, cls in METHODS[family].items()}


__all__ = ["METHODS", "Edit", "MethodResult", "UnlearningContext", "UnlearningMethod", "get_method",
           "list_methods", "register_method"]
