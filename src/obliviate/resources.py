"""Peak memory of a block of work, as a delta over what was in use when it started.

On CUDA the allocator's own peak counter; on CPU the process's resident set, sampled every few
milliseconds from ``/proc/self/statm`` by a background thread (where that file does not exist the
figure is ``None`` rather than a number that measures something else)."""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")


def resident_bytes() -> int | None:
    """The process's resident set size now, or ``None`` where the platform does not say."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as meter: ...`` then ``meter.peak_bytes`` (the most memory in
    use above the level at entry) and ``meter.kind`` (what was measured)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes: int | None = None
        self.kind = "cuda allocated" if self.device.type == "cuda" else "process resident set (sampled)"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._start = resident_bytes()
        self._highest = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = resident_bytes()
            if now is not None and now > self._highest:
                self._highest = now

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        if self._start is None:
            return
        self._thread.join()
        now = resident_bytes()
        self._highest = max(self._highest, now if now is not None else self._highest)
        self.peak_bytes = self._highest - self._start


class TensorCensus:
    """``with TensorCensus(("obliviate.engine",)) as census: ...`` then ``census.peak_bytes``:
    the most bytes live torch tensors held at once above the level at entry, counted each time a
    function of a module under one of ``packages`` returns (what a function held while it ran is
    still held when it returns; comprehensions, lambdas and dunder methods are skipped).
    ``peak_at`` names the function whose return saw the peak.

    Exact where ``PeakMemory`` samples: each count walks the garbage collector's objects and adds
    up every distinct storage that Python tensors view, so shared and viewed tensors count once.
    Tensors only C++ holds (autograd's saved activations) are not seen. Slow (a walk per return):
    a test's tool for small models, not a production meter."""

    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages
        self.peak_bytes = 0
        self.peak_at = ""

    @staticmethod
    def live_bytes() -> int:
        storages: dict[int, int] = {}
        is_tensor: dict[type, bool] = {}  # type(), not isinstance: some modules warn when asked for __class__
        for obj in gc.get_objects():
            kind = type(obj)
            if kind not in is_tensor:
                is_tensor[kind] = issubclass(kind, torch.Tensor)
            if is_tensor[kind] and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _count(self, where: str) -> None:
        live = self.live_bytes() - self._start
        if live > self.peak_bytes:
            self.peak_bytes, self.peak_at = live, where

    def _on_event(self, frame, event, arg) -> None:
        name, module = frame.f_code.co_name, frame.f_globals.get("__name__", "")
        if event == "return" and not name.startswith(("<", "__")) and module.startswith(self.packages):
            self._count(f"{module}.{frame.f_code.co_qualname}")

    def __enter__(self) -> "TensorCensus":
        self._previous = sys.getprofile()
        self._start = self.live_bytes()
        sys.setprofile(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._previous)
        self._count("exit")
