"""Where benchmark cells run: one after another in this process (``serial``), or as Ray tasks on
a local Ray instance or a user's cluster (``ray``, ``ray:address=auto,num_gpus=1``). Either way
the driver writes each finished cell's file, so a sweep resumes the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence


class Executor(Protocol):
    def run(self, function: Callable, calls: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        """``(i, function(*calls[i]))`` for every call, each as soon as it has finished."""


@dataclass(frozen=True)
class SerialExecutor:
    def run(self, function: Callable, calls: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        for i, arguments in enumerate(calls):
            yield i, function(*arguments)


@dataclass(frozen=True)
class RayExecutor:
    address: str = field(default="", metadata={
        "help": "a Ray cluster to join (auto, or ray://HOST:10001); empty = start a local Ray instance"})
    num_cpus: float = field(default=1.0, metadata={
        "help": "CPUs one cell reserves; torch runs on this many threads (rounded up)", "range": (0.0, 1024.0)})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs one cell reserves (fractions share one)", "range": (0.0, 64.0)})

    def run(self, function: Callable, calls: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        try:
            import ray
        except ImportError:
            raise ValueError("--executor ray needs Ray: pip install 'obliviate[ray]' (or pip install ray).") from None
        if not ray.is_initialized():
            ray.init(address=self.address or None, include_dashboard=False, configure_logging=False)
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_on_threads)
        threads = max(1, math.ceil(self.num_cpus))
        pending = {task.remote(threads, function, *arguments): i for i, arguments in enumerate(calls)}
        while pending:
            (finished,), _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(finished), ray.get(finished)


def _on_threads(threads: int, function: Callable, *arguments):
    """``function(*arguments)`` with torch on ``threads`` threads: its CPU kernels sum in an order
    that depends on the thread count, so a cell's weights are bit-identical to a serial run's on
    as many threads."""
    import torch
    torch.set_num_threads(threads)
    return function(*arguments)


EXECUTORS = {"serial": SerialExecutor, "ray": RayExecutor}


def get_executor(spec: str) -> Executor:
    """An executor from ``NAME:key=value,...`` (e.g. ``ray:address=auto``)."""
    from .config import build_config, parse_spec
    name, options = parse_spec(spec)
    if name not in EXECUTORS:
        raise ValueError(f"Unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}.")
    return build_config(EXECUTORS[name], options, owner=f"executor {name!r}")
