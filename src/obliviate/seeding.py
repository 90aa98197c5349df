"""Seeding without side effects: library calls never leave the caller's global random state
changed. Code that must use torch's global generators (module initialisation draws from them)
runs inside ``seeded``; everything else takes a ``torch.Generator`` or ``np.random.Generator``."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int):
    """Run the block with torch's global generators (CPU and every CUDA device) seeded by
    ``seed``; their previous states are restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def seeded_by_recipe(fn):
    """Decorate ``fn(recipe, ...)`` to run inside ``seeded(recipe.seed)``."""
    @functools.wraps(fn)
    def wrapper(recipe, *args, **kwargs):
        with seeded(recipe.seed):
            return fn(recipe, *args, **kwargs)
    return wrapper
