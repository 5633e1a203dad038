"""Rich progress on stderr, shared by the commands that may download and load a model:
a download's bar, then a spinner while the model loads (``load_model``).

stdout stays clean for the command's own output (``--json`` above all); the bar goes to
stderr and only appears when a download actually runs. Sizes and speeds are written by
``format_bytes``, in the binary units every other size pcrt prints uses (rich's own
download columns would write decimal MB).

Commands import this module inside their functions: it imports rich.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pcrt.device.units import format_bytes

if TYPE_CHECKING:
    from pcrt.runtime.engine import Engine
    from pcrt.runtime.models.download import ProgressCallback
    from pcrt.runtime.models.registry import Registry

__all__ = ["download_progress", "load_model"]


class _SizeColumn(ProgressColumn):
    """``12.5 MiB/98.2 MiB``, or the bytes so far when the size is unknown."""

    def render(self, task: Task) -> Text:
        done = format_bytes(task.completed)
        text = done if task.total is None else f"{done}/{format_bytes(task.total)}"
        return Text(text, style="progress.download")


class _SpeedColumn(ProgressColumn):
    """``4.2 MiB/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = "?" if speed is None else f"{format_bytes(speed)}/s"
        return Text(text, style="progress.data.speed")


@contextmanager
def download_progress(
    description: str, *, console: Console | None = None
) -> Iterator[ProgressCallback]:
    """A progress bar (bytes, speed, ETA) on stderr; yields the callback a download calls."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        _SizeColumn(),
        _SpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    with progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def load_model(
    registry: Registry, name: str | None, *, console: Console | None = None, **overrides: Any
) -> Engine:
    """The model this command runs itself (no daemon): a download's bar if one runs, then,
    on a terminal, a spinner while llama.cpp loads it (seconds of nothing otherwise). The
    download is done first, so the bar has ended before the spinner starts: two live
    displays at once would garble each other."""
    from pcrt.runtime.models.loader import open_engine
    from pcrt.runtime.models.pull import ensure_pulled

    entry = registry.resolve(name)
    ensure_pulled(entry, registry, progress=download_progress)
    console = console or Console(stderr=True)
    if not console.is_terminal:
        return open_engine(registry, name, **overrides)
    with console.status(f"loading {entry.name}...", spinner="dots"):
        return open_engine(registry, name, **overrides)
