"""An exclusive, process-wide lock on a store directory (``flock`` on ``STORE/lock``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from ..errors import StoreLocked


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: float = 0.0, poll: float = 0.1):
    """Hold the lock for the block. Waits up to ``wait`` seconds, then raises ``StoreLocked``
    naming the process that holds it. The kernel releases the lock if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = Path(path).read_text().strip() or "another process"
                    raise StoreLocked(f"Store {path.parent} is busy: locked by {holder}. Wait for it to finish, "
                                      f"or pass --wait SECONDS to wait for the lock.") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
