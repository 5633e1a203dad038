"""Rich progress bars on stderr, shared by the commands that may download a model.

stdout stays clean for the command's own output (``--json`` above all); the bar goes to
stderr and only appears when a download actually runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pcrt.runtime.models.download import ProgressCallback

__all__ = ["download_progress"]


@contextmanager
def download_progress(
    description: str, *, console: Console | None = None
) -> Iterator[ProgressCallback]:
    """A progress bar (bytes, speed, ETA) on stderr; yields the callback a download calls."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    with progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update
