"""obliviate: continual unlearning for text-to-image diffusion models and image classifiers."""

from .engine import Request, Store
from .models.t2i import T2IModel
from . import methods, regularizers, world

__version__ = "0.1.0"
__all__ = ["Request", "Store", "T2IModel", "methods", "regularizers", "world", "__version__"]
