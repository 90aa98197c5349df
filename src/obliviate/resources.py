"""Peak memory of a block of work, as a delta over what was in use when it started.

On CUDA the allocator's own peak counter; on CPU the process's resident set, sampled every few
milliseconds from ``/proc/self/statm`` by a background thread (where that file does not exist the
figure is ``None`` rather than a number that measures something else)."""

from __future__ import annotations

import os
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
