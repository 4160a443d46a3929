"""Console progress with ETA (rich), shown only on a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _Bar:
    def __init__(self, progress=None, task=None):
        self._progress, self._task = progress, task

    def advance(self, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, status=status)


@contextlib.contextmanager
def progress_bar(show: bool, total: int, label: str) -> Iterator[_Bar]:
    if not show:
        yield _Bar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), transient=True,
    ) as progress:
        yield _Bar(progress, progress.add_task(label, total=total, status=""))
