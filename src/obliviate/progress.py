"""A small progress-bar helper shared by training, unlearning and evaluation loops."""

from __future__ import annotations

import contextlib
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0):
    """Yields ``advance(n, **fields)``; shows a rich bar on a terminal and stays silent otherwise."""
    if not sys.stderr.isatty():
        yield lambda n=1, **fields: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields}"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield lambda n=1, **fields: progress.update(task, advance=n, **fields)


class RequestProgress:
    """One bar per request while ``Store.apply`` runs: ``start(rid, request)`` then ``advance``."""

    def __init__(self, echo=print):
        self.echo = echo
        self._progress = None
        self._task = None

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
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"request {rid}", total=request.method_config.get("steps"))

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, **fields)
