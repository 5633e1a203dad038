"""Running the daemon in this process (``pcrt serve``): uvicorn, with a draining exit."""

from __future__ import annotations

from typing import Any

import uvicorn

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
    """Serve until SIGTERM/SIGINT, then drain."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )
    _DrainingServer(config).run()
