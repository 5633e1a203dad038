"""The daemon's FastAPI app, built by a factory; its lifespan owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import Depends, FastAPI, Request

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.device.monitor import DeviceMonitor
from pcrt.routing.auth import CLUSTER_HEADER
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.identity import announce_address, load_node_id
from pcrt.routing.remote import RemoteRunner
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.dag.tasks import DagTasks
from pcrt.runtime.engine import Engine
from pcrt.runtime.errors import InvalidRequest, Unauthorized
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.battery_watch import BatteryReader, watch_battery
from pcrt.runtime.server.http_errors import install_error_handlers
from pcrt.runtime.server.limits import RateLimiter
from pcrt.runtime.server.metrics import Metrics
from pcrt.runtime.server.moving import Drain
from pcrt.runtime.server.node_info import NodeInfo
from pcrt.runtime.server.pool import EngineOpener, ModelPool
from pcrt.runtime.server.routes import admin, dags, openai, peers, states
from pcrt.runtime.server.routes.peers import streamed_body_sha256
from pcrt.runtime.server.services import Services, dag_billing, services_of
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.textcheck import broken_text_at

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(
    settings: ServerSettings,
    *,
    registry: Registry | None = None,
    opener: EngineOpener = open_engine,
    battery: BatteryReader | None = None,
) -> FastAPI:
    """``battery``: where ``migrate_on_battery`` reads the battery (default: the device
    monitor's latest reading); tests pass a synthetic one."""
    settings.check_exposure()
    api_key = settings.resolved_api_key()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry or Registry.load()
        store = Store(reg.paths.db_path)
        monitor = DeviceMonitor(interval=settings.device_refresh)
        await monitor.start()

        def open_with_live_profile(*args: Any, **kwargs: Any) -> Engine:
            # plan offload from free memory now, not at start-up
            return opener(*args, profile=monitor.latest, **kwargs)

        pool = ModelPool(reg, settings, open_with_live_profile)
        blobs = BlobStore(store, reg.paths.home / "blobs", max_bytes=settings.blob_max_bytes)
        runs = RunStore(store)
        node_id = load_node_id(reg.paths.home)
        node_name = settings.peers.name or socket.gethostname().split(".")[0] or "pcrt"
        usage = UsageLog(store)
        limiter, metrics = RateLimiter(settings.limits), Metrics(_live_gauges(pool))
        node = NodeInfo(
            node_id,
            node_name,
            reg,
            pool,
            monitor,
            store,
            settings.context,
            parallel=settings.parallel,
            usage=usage,
        )
        coordinator = Coordinator(
            settings.peers,
            node_id=node_id,
            node_name=node_name,
            api_port=settings.port,
            announce_address=announce_address(settings.host, settings.peers.interfaces),
            local_view=node.local_view,
            local_models=lambda: sorted(reg.entries),
        )
        node.addresses, node.port = coordinator.own_hosts, settings.port
        services = Services(
            settings=settings,
            pool=pool,
            monitor=monitor,
            usage=usage,
            limiter=limiter,
            metrics=metrics,
            blobs=blobs,
            dags=DagTasks(
                DagRunner(
                    registry=reg,
                    runs=runs,
                    blobs=blobs,
                    lease=_engine_lease(pool),
                    remote=RemoteRunner(coordinator),
                    usage=dag_billing(usage, limiter, metrics),
                    cache_entries=settings.dag_cache_entries,
                )
            ),
            coordinator=coordinator,
            node=node,
        )
        app.state.services = services
        interrupted = runs.mark_interrupted()  # runs a dead daemon left "running"
        if interrupted:
            log.info("interrupted DAG runs: %s", ", ".join(interrupted))
        reaper = asyncio.create_task(pool.reap_forever(), name="pcrt-keep-alive-reaper")
        await coordinator.start()
        resumer = None
        if settings.resume_on_start:
            resumer = asyncio.create_task(_resume_interrupted(services), name="pcrt-resume")
        watcher = None
        if settings.peers.migrate_on_battery:
            read = battery or (lambda: monitor.latest.battery)
            watcher = asyncio.create_task(
                watch_battery(services, read, settings.peers.battery_interval),
                name="pcrt-battery-watch",
            )
        drain = Drain(services, watcher)
        loop = asyncio.get_running_loop()
        services.begin_drain = lambda: loop.call_soon_threadsafe(drain.begin)  # SIGTERM
        services.state = "serving"
        log.info("serving on %s:%d", settings.host, settings.port)
        try:
            yield
        finally:
            if resumer is not None:
                resumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await resumer
            moved = await drain.finish()
            if moved:
                log.info("moved to peers on drain: %s", ", ".join(moved))
            await services.dags.close()  # running DAGs stop; their checkpoints stay
            await coordinator.close()  # goodbye packets: peers drop us at once
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await pool.close()
            await monitor.stop()
            usage.close()
            store.close()

    async def require_key(request: Request) -> None:
        # a peer proves the cluster key instead of holding our API key; checked once here
        # (the nonce is spent), the routes for peers read the verdict
        request.state.peer_verified = False
        signature = request.headers.get(CLUSTER_HEADER)
        if signature is not None:
            services = services_of(request)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            declared = streamed_body_sha256(request)
            if declared is not None:  # a blob: the route streams it and checks its hash
                why = services.coordinator.check_peer_request(
                    signature, request.method, target, body_sha256=declared
                )
            else:
                body = await request.body()  # cached: the route reads it again
                why = services.coordinator.check_peer_request(
                    signature, request.method, target, body
                )
            if why is not None:
                log.warning("refused a peer request to %s: %s", request.url.path, why)
                raise Unauthorized(f"cluster signature refused: {why}")
            request.state.peer_verified = True
            return
        if api_key is None or request.url.path == "/health":
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), api_key.encode()
        ):
            raise Unauthorized("missing or wrong API key (send Authorization: Bearer KEY)")

    async def guard(request: Request) -> None:
        # one dependency, not two: each costs every request its resolution
        await require_key(request)
        await refuse_broken_text(request)

    app = FastAPI(
        title="pcrt",
        lifespan=lifespan,
        dependencies=[Depends(guard)],
    )
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(states.router)
    app.include_router(dags.router)
    app.include_router(peers.router)
    return app


async def refuse_broken_text(request: Request) -> None:
    """A JSON body may escape half of a UTF-16 pair ("\\ud800"). Python decodes it to a
    str that is no UTF-8 text: the tokenizer, SQLite and the answer would each fail on it
    later, some after work was done or recorded. It is a 400 before anything runs."""
    if request.method != "POST" or "json" not in request.headers.get("content-type", "").lower():
        return  # uploads (PUT) stream past this unread, whatever they call themselves
    body = await request.body()  # FastAPI has read it already
    if b"\\ud" not in body and b"\\uD" not in body:
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # FastAPI answers malformed JSON itself
    where = broken_text_at(data)
    if where is not None:
        raise InvalidRequest(
            f"{where} holds an unpaired UTF-16 surrogate escape (like \\ud800): not text"
        )


async def _resume_interrupted(services: Services) -> None:
    """``resume_on_start``: interrupted runs go on once the peers that answer are known;
    resumed before discovery, a node meant for a peer would fail or run here for want of
    one."""
    if services.coordinator.enabled:
        await services.coordinator.settle()
    for run in services.dags.runner.runs.list_runs(status="interrupted"):
        log.info("resuming DAG run %s", run.id)
        services.dags.start(run.id)


def _engine_lease(pool: ModelPool) -> Callable[[str], AbstractAsyncContextManager[Engine]]:
    """DAG nodes take their engine through the pool: loads, keep-alive and limits apply."""

    @contextlib.asynccontextmanager
    async def lease(name: str) -> AsyncIterator[Engine]:
        # a running DAG's next node is not refused while the daemon drains: the drain
        # moves the run or stops it as interrupted (resumable), never fails it
        async with pool.lease(name, while_draining=True) as model:
            yield model.engine

    return lease


def _live_gauges(pool: ModelPool) -> Callable[[], dict[str, list[tuple[dict[str, str], float]]]]:
    def read() -> dict[str, list[tuple[dict[str, str], float]]]:
        models = pool.loaded()
        return {
            "pcrt_queue_depth": [({"model": m.name}, m.engine.queue_depth) for m in models],
            "pcrt_busy_slots": [({"model": m.name}, m.engine.busy_slots) for m in models],
            "pcrt_loaded_models": [({}, len(models))],
        }

    return read
