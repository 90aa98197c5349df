"""A small progress-bar helper shared by training, unlearning and evaluation loops."""

from __future__ import annotations

import contextlib
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Without a terminal (nohup, CI, a remote job's log) progress is a plain line at most this often.
LOG_EVERY_SECONDS = 60.0


class ProgressLines:
    """``advance(n, **fields)`` for logs: a line on ``stream`` when at least ``every`` seconds
    have passed since the last one, so a long run's log shows it is moving and how fast."""

    def __init__(self, description: str, total: int | None, completed: int = 0, every: float = LOG_EVERY_SECONDS,
                 stream=None, clock=time.monotonic):
        self.description, self.total, self.completed, self.every = description, total, completed, every
        self.stream, self.clock = stream, clock
        self.start = self.last = clock()
        self.start_count = completed

    def __call__(self, n: int = 1, **fields) -> None:
        self.completed += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed, done = now - self.start, self.completed - self.start_count
        line = f"{self.description}: {self.completed}" + (f"/{self.total}" if self.total else "") + f" after {elapsed:.0f} s"
        if self.total and done > 0:
            line += f", about {(self.total - self.completed) * elapsed / done:.0f} s left"
        if fields:
            line += " (" + ", ".join(f"{k} {v}" for k, v in fields.items()) + ")"
        print(line, file=self.stream or sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0):
    """Yields ``advance(n, **fields)``: a rich bar on a terminal, timed log lines otherwise."""
    if not sys.stderr.isatty():
        yield ProgressLines(description, total, completed)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields}"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield lambda n=1, **fields: progress.update(task, advance=n, **fields)


class RequestProgress:
    """One bar per request while ``Store.apply`` runs: ``start(rid, request)`` then ``advance``
    (timed log lines instead of a bar without a terminal)."""

    def __init__(self, echo=print):
        self.echo = echo
        self._progress = None
        self._task = None
        self._lines: ProgressLines | None = None

    def __enter__(self):
        if sys.stderr.isatty():
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields}"), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, rid, request) -> None:
        self.echo(f"applying request {rid}: forget {request.label} with {request.method}")
        steps = request.method_config.get("steps")
        if self._progress is None:
            self._lines = ProgressLines(f"request {rid}", steps)
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"request {rid}", total=steps)

    def advance(self, n: int = 1, **fields) -> None:
        if self._lines is not None:
            self._lines(n, **fields)
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, **fields)
