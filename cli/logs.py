"""``pcrt logs``: the daemon's log (model loads and unloads, DAG runs started and
finished, peers, errors), as ``pcrt serve`` writes it under PCRT_HOME."""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import TextIO

import click

from pcrt.runtime.errors import PcrtError
from pcrt.runtime.paths import Paths

__all__ = ["logs"]

POLL_SECONDS = 0.5  # how often --follow looks for new lines


@click.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many of the last lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
def logs(lines: int, follow: bool) -> None:
    """Show the daemon's log (PCRT_HOME/logs/daemon.log)."""
    path = Paths.from_env().daemon_log
    if not path.exists():
        raise PcrtError(f"no daemon log at {path}: pcrt serve writes it while it runs")
    with path.open(encoding="utf-8", errors="replace") as log:
        for line in deque(log, maxlen=max(0, lines)):
            click.echo(line, nl=False)
        if follow:
            _follow(path, log)


def _follow(path: Path, log: TextIO) -> None:
    """New lines as they come; after a rotation, the new file from its start."""
    inode = os.fstat(log.fileno()).st_ino
    while True:
        line = log.readline()
        if line:
            click.echo(line, nl=False)
            continue
        time.sleep(POLL_SECONDS)
        try:
            now = path.stat().st_ino
        except FileNotFoundError:
            continue  # between the rotation's rename and the new file
        if now != inode:
            log.close()
            log, inode = path.open(encoding="utf-8", errors="replace"), now
