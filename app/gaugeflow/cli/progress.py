"""Console progress with ETA (rich), shown only on a terminal and only on rank 0."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class _Bar:
    def __init__(self, progress=None, task=None):
        self._progress, self._task = progress, task

    def advance(self, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, status=status)


@contextlib.contextmanager
def progress_bar(show: bool, total: int, label: str, rank: int = 0) -> Iterator[_Bar]:
    """A bar with ETA and a status text; a no-op unless ``show``, stdout is a terminal and this is rank 0.

    Every rank of a distributed job runs the same loop; one bar per rank would
    interleave on the shared terminal, so only rank 0 draws. In a batch log a
    redrawn bar is only noise, hence the terminal check.
    """
    if not show or rank != 0 or not sys.stdout.isatty():
        yield _Bar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), transient=True,
    ) as progress:
        yield _Bar(progress, progress.add_task(label, total=total, status=""))
