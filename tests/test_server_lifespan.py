"""The daemon's lifespan: a start that fails midway closes what it had opened (no task of
pcrt left running, the store closed), a normal start and stop still work, and a draining
daemon is unhealthy and refuses new requests.

The lifespan runs in the test's own event loop (``app.router.lifespan_context``), so its
tasks are visible; no model is loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import psutil
import pytest

from pcrt.device.profile import Battery
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.app import create_app
from pcrt.runtime.server.services import Services
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import ServerFactory, free_port

MODEL = "smollm2-135m"
# TEST-NET-1 (RFC 5737): never an address of this machine, so mDNS cannot bind to it
NOT_HERE = "192.0.2.1"


def _new_tasks(before: set[asyncio.Task[object]]) -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() - before if not t.done())


def _open_under(home: Path) -> list[str]:
    """Files this process holds open under ``home`` (the store: pcrt.db, its WAL)."""
    return [f.path for f in psutil.Process().open_files() if Path(f.path).is_relative_to(home)]


def _settings(**peers: object) -> ServerSettings:
    return ServerSettings(
        port=free_port(), device_refresh=0.05, peers=PeerSettings.model_validate(peers)
    )


async def test_a_start_that_fails_midway_closes_what_it_opened(pcrt_env: Paths) -> None:
    """The coordinator's start fails (mDNS on an interface this machine lacks) after the
    store, the device monitor, the pool, its reaper, the coordinator's clients and the
    DAG tasks exist: each is closed, and the error is the start's own."""
    app = create_app(_settings(lan=True, interfaces=[NOT_HERE]))
    before = asyncio.all_tasks()
    with pytest.raises(OSError):
        async with app.router.lifespan_context(app):
            pytest.fail("the start should have failed")
    # pcrt-device-monitor (the monitor stopped), pcrt-keep-alive-reaper, ...
    assert _new_tasks(before) == []
    assert _open_under(pcrt_env.home) == []  # the store is closed
    assert not hasattr(app.state, "services")  # nothing half-started is served


async def test_a_normal_start_serves_and_a_stop_closes_everything(pcrt_env: Paths) -> None:
    readings: list[float] = []

    def battery() -> Battery | None:
        readings.append(100.0)
        return Battery(percent=100.0, plugged_in=True, seconds_left=None)

    settings = _settings(migrate_on_battery=True, battery_interval=0.05)
    settings = settings.model_copy(update={"resume_on_start": True})
    app = create_app(settings, battery=battery)
    before = asyncio.all_tasks()
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        assert services.state == "serving" and services.begin_drain is not None
        assert services.node.port == settings.port and "127.0.0.1" in services.node.addresses
        running = _new_tasks(before)
        for name in ("pcrt-device-monitor", "pcrt-keep-alive-reaper", "pcrt-peer-health"):
            assert name in running
        assert _open_under(pcrt_env.home) != []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            health = await client.get("/health")
            models = await client.get("/v1/models")
        assert health.status_code == 200 and health.json() == {"status": "serving"}
        assert models.status_code == 200 and models.json()["object"] == "list"
        await asyncio.sleep(0.2)
        assert readings  # the battery watcher runs
    assert services.state == "draining"  # the stop drained first
    assert _new_tasks(before) == []
    assert _open_under(pcrt_env.home) == []
    assert not services.monitor.running


def test_health_is_503_while_draining(live_server: ServerFactory) -> None:
    settings = ServerSettings(parallel=1, context=512, n_threads=2)
    live = live_server(settings)
    live.services.state = "draining"
    live.services.pool.start_draining()
    assert httpx.get(live.url + "/health").status_code == 503
    refused = httpx.post(
        live.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}
    )
    assert refused.status_code == 503 and "Retry-After" in refused.headers
