"""Running the daemon in this process (``pcrt serve``): uvicorn, with a draining exit."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from pcrt.runtime.errors import ConfigError
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.app import create_app
from pcrt.runtime.server.settings import ServerSettings

__all__ = ["run_daemon"]


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, stop admitting at once; uvicorn then lets running requests
    finish within the grace period and the lifespan closes the models."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        services = getattr(self.config.app.state, "services", None)  # type: ignore[union-attr]
        if services is not None:
            services.state = "draining"
            services.pool.start_draining()
            if services.begin_drain is not None:  # migrate_on_drain: moves start now
                services.begin_drain()
        super().handle_exit(sig, frame)


def run_daemon(settings: ServerSettings, log_level: str) -> None:
    """Serve until SIGTERM/SIGINT, then drain. A second daemon on the same PCRT_HOME (its
    database, runs and KV store are one daemon's) or on a port in use is refused with
    one line that says what to do, before anything starts."""
    paths = Paths.from_env()
    with _home_lock(paths.home):
        _refuse_a_taken_port(settings.host, settings.port)
        _log_to_file(paths.daemon_log)
        config = uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            timeout_graceful_shutdown=int(settings.shutdown_grace),
        )
        _DrainingServer(config).run()


def _log_to_file(path: Path) -> None:
    """The daemon's log, at INFO (model loads and unloads, runs started and finished,
    peers, errors), also in a file that rotates at 10 MB (3 kept); the terminal keeps the
    level it was given (--log-level)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(root.level)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = logging.handlers.RotatingFileHandler(
        path, maxBytes=10 * 1024**2, backupCount=3, encoding="utf-8"
    )
    written.setLevel(logging.INFO)
    written.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(written)
    root.setLevel(min(root.level, logging.INFO))


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """Hold PCRT_HOME for this daemon (an advisory lock the OS drops when the process
    ends, however it ends); a second ``pcrt serve`` on it is refused."""
    if sys.platform == "win32":  # no fcntl: one daemon per home is the user's to keep
        yield
        return
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    path = home / "daemon.lock"
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise ConfigError(
                f"another pcrt serve (pid {holder}) uses {home}: stop it (pcrt ps shows "
                "it), or give this one a home of its own (PCRT_HOME)"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def _refuse_a_taken_port(host: str, port: int) -> None:
    """One clear line for a port already in use, instead of uvicorn's start-up log
    followed by [Errno 98]."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {host} is in use ({exc.strerror or exc}): is a daemon "
                "running already? (pcrt ps); or serve on another port (pcrt serve --port N)"
            ) from None
