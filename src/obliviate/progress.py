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
