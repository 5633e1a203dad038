"""The daemon's FastAPI app, built by a factory; its lifespan runs the services
(``lifespan.py``), every request passes the guard (``guard.py``, a middleware in front of
the app: before any body is read) and every error leaves in OpenAI's shape
(``http_errors.py``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.battery_watch import BatteryReader
from pcrt.runtime.server.bodies import BodyBounds
from pcrt.runtime.server.guard import Guard
from pcrt.runtime.server.http_errors import install_error_handlers
from pcrt.runtime.server.lifespan import running_services
from pcrt.runtime.server.pool import EngineOpener
from pcrt.runtime.server.routes import (
    admin,
    anthropic,
    dags,
    ollama,
    openai,
    peers,
    responses,
    states,
    tools,
    ui,
)
from pcrt.runtime.server.serving import Serving
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.server.ui_site import UiSite

__all__ = ["create_app"]


def create_app(
    settings: ServerSettings,
    *,
    registry: Registry | None = None,
    opener: EngineOpener = open_engine,
    battery: BatteryReader | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """``opener``: what loads a model (tests pass a fake engine's); ``battery``: where
    ``migrate_on_battery`` reads the battery (default: the device monitor's latest
    reading), tests pass a synthetic one; ``clock``: the monotonic clock the rate limits
    refill by, tests pass one they move by hand."""
    settings.check_exposure()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_services(
            settings, registry=registry, opener=opener, battery=battery, clock=clock
        ) as services:
            app.state.services = services
            app.state.serving = Serving.of(services)
            yield

    app = FastAPI(title="pcrt", lifespan=lifespan)
    api_key = settings.resolved_api_key()  # read once: the guard and the login agree
    app.state.ui = UiSite.load(api_key, settings.port)
    app.add_middleware(
        Guard,
        api_key=api_key,
        bounds=BodyBounds(settings),
        ui_cookie=app.state.ui.cookie,
        allowed_hosts=frozenset(h.lower() for h in settings.allowed_hosts),
    )
    install_error_handlers(app)
    for routes in (openai, anthropic, responses, ollama, admin, states, dags, peers, tools, ui):
        app.include_router(routes.router)
    return app
