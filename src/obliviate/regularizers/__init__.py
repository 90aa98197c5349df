"""Regularizers for continual unlearning, registered by name."""

from .base import REGULARIZERS, Regularizer, check_composition, get_regularizer, register_regularizer
from . import (adversarial, drift, ewc, merge, meta, orthogonal, output_projection,  # noqa: F401,E402  (register the built-ins)
               preservation, projection, rehearsal, resalign, selective)

__all__ = ["REGULARIZERS", "Regularizer", "check_composition", "get_regularizer", "register_regularizer"]
