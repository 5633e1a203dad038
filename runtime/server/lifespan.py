"""The daemon's services from start to stop (``running_services``).

Each resource is registered on one ``AsyncExitStack`` the moment it exists, so a start
that fails midway (a node id it cannot write, a coordinator that cannot start, mDNS
refused) closes what it had opened, and a stop closes everything in reverse order of
creation, each close running even when one before it failed. That order is the
shutdown's:

    resumer          cancelled first: no run starts while the daemon stops
    drain            stops the battery watcher, moves running runs to peers (migrate_on_drain)
    battery watcher  (stopped by the drain already; cancelled here when the start failed)
    DAG tasks        running DAGs stop as interrupted; their checkpoints stay
    node info        a refresh of its facts (model sizes and speeds) under way ends
    coordinator      goodbye packets: peers drop us at once; its HTTP clients close
    tools            MCP sessions close, their server processes stop; the HTTP client closes
    reaper           the keep-alive reaper stops before the pool it reaps
    pool             every loaded model closes
    device monitor, usage log (its queued rows written first), store
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

from pcrt.cache.async_runs import AsyncResponses
from pcrt.cache.blobs import BlobStore
from pcrt.cache.chunks import ChunkStore
from pcrt.cache.responses import ResponseStore
from pcrt.cache.runs import RunStore
from pcrt.cache.status import RunStatus
from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.device.monitor import DeviceMonitor
from pcrt.device.profile import BACKEND_NEEDS, DeviceProfile
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.identity import announce_address, load_node_id
from pcrt.routing.remote import RemoteRunner
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.dag.tasks import DagTasks
from pcrt.runtime.engine import EngineClient
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.battery_watch import BatteryReader, watch_battery
from pcrt.runtime.server.limits import RateLimiter
from pcrt.runtime.server.metrics import Metrics
from pcrt.runtime.server.moving import Drain
from pcrt.runtime.server.node_info import NodeInfo
from pcrt.runtime.server.pool import EngineOpener, ModelPool
from pcrt.runtime.server.services import DaemonState, Services, dag_billing, tool_accounting
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.threads import to_thread_to_completion
from pcrt.runtime.tools import ToolRegistry

__all__ = ["running_services"]

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_services(
    settings: ServerSettings,
    *,
    registry: Registry | None = None,
    opener: EngineOpener = open_engine,
    battery: BatteryReader | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Services]:
    """The daemon's services, serving until the block ends; then closed (also when the
    start fails). ``registry`` None: loaded from the environment now. ``battery``: where
    ``migrate_on_battery`` reads the battery (default: the device monitor's reading).
    ``clock``: what the rate limits refill by."""
    async with AsyncExitStack() as stack:
        reg = registry or Registry.load()
        store = Store(reg.paths.db_path)
        stack.callback(store.close)
        usage = UsageLog(store)
        # its queued rows are written first: off the loop, which still serves meanwhile
        stack.push_async_callback(to_thread_to_completion, usage.close)
        monitor = DeviceMonitor(interval=settings.device_refresh)
        stack.push_async_callback(monitor.stop)  # a no-op unless it started
        await monitor.start()
        _say_gpu_unused(monitor.latest)
        ram = settings.kv_ram_for(monitor.latest.memory.total)
        chunks = _chunk_store(settings, ram, store, reg.paths.home / "chunks")
        if chunks is not None:  # closed after the pool: engines spill into it to the end
            stack.callback(chunks.close)
        pool = ModelPool(reg, settings, _with_live_profile(opener, monitor, chunks))
        stack.push_async_callback(pool.close)
        _cancel_on_close(
            stack, asyncio.create_task(pool.reap_forever(), name="pcrt-keep-alive-reaper")
        )

        blobs = BlobStore(store, reg.paths.home / "blobs", max_bytes=settings.blob_max_bytes)
        runs = RunStore(store)
        responses = AsyncResponses(ResponseStore(store, kept=settings.responses_kept))
        limiter = RateLimiter(settings.limits, clock)
        metrics = Metrics(_live_gauges(pool), chunks=chunks.stats if chunks else None)
        # MCP servers start here, each within its connect_timeout; one that fails is a
        # problem the registry lists, not a daemon that fails to start. Closed after the
        # DAG tasks that may call them.
        tools = await stack.enter_async_context(
            ToolRegistry(settings.tools, on_call=tool_accounting(usage, metrics))
        )
        node_id, node_name = load_node_id(reg.paths.home), _node_name(settings)
        node: NodeInfo  # the coordinator asks it for the local view once started, not here
        coordinator = Coordinator(
            settings.peers,
            node_id=node_id,
            node_name=node_name,
            api_port=settings.port,
            announce_address=announce_address(settings.host, settings.peers.interfaces),
            local_view=lambda: node.local_view(),
            local_models=lambda: sorted(reg.entries),
        )
        stack.push_async_callback(coordinator.close)  # its HTTP clients exist already
        node = NodeInfo(
            node_id,
            node_name,
            reg,
            pool,
            monitor,
            store,
            settings.context,
            parallel=settings.parallel,
            addresses=coordinator.own_hosts,
            port=settings.port,
            usage=usage,
            tools=frozenset(t.name for t in tools.tools()),
            idempotent_tools=frozenset(t.name for t in tools.tools() if t.idempotent),
        )
        stack.push_async_callback(node.close)  # a refresh of its facts reads the store
        dags = DagTasks(
            DagRunner(
                registry=reg,
                runs=runs,
                blobs=blobs,
                lease=_engine_lease(pool),
                remote=RemoteRunner(coordinator),
                usage=dag_billing(usage, limiter, metrics),
                cache_entries=settings.dag_cache_entries,
                tools=tools,
            )
        )
        stack.push_async_callback(dags.close)  # running DAGs stop; their checkpoints stay
        services = Services(
            settings=settings,
            pool=pool,
            monitor=monitor,
            usage=usage,
            limiter=limiter,
            metrics=metrics,
            blobs=blobs,
            chunks=chunks,
            dags=dags,
            coordinator=coordinator,
            node=node,
            tools=tools,
            responses=responses,
        )

        interrupted = await dags.runs.mark_interrupted()  # runs a dead daemon left "running"
        if interrupted:
            log.info("interrupted DAG runs: %s", ", ".join(interrupted))
        await node.refresh()  # the models' sizes and speeds, before any view asks for them
        await coordinator.start()
        watcher = None
        if settings.peers.migrate_on_battery:
            read = battery or (lambda: monitor.latest.battery)
            watcher = asyncio.create_task(
                watch_battery(services, read, settings.peers.battery_interval),
                name="pcrt-battery-watch",
            )
            _cancel_on_close(stack, watcher)
        drain = Drain(services, watcher)
        stack.push_async_callback(_finish_drain, drain)
        if settings.resume_on_start:
            resumer = asyncio.create_task(_resume_interrupted(services), name="pcrt-resume")
            _cancel_on_close(stack, resumer)

        loop = asyncio.get_running_loop()
        services.begin_drain = lambda: loop.call_soon_threadsafe(drain.begin)  # SIGTERM
        services.state = DaemonState.SERVING
        log.info("serving on %s:%d", settings.host, settings.port)
        yield services


def _cancel_on_close(stack: AsyncExitStack, task: asyncio.Task[Any]) -> None:
    """``task`` is cancelled, and waited for, when the stack closes."""

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


async def _finish_drain(drain: Drain) -> None:
    moved = await drain.finish()
    if moved:
        log.info("moved to peers on drain: %s", ", ".join(moved))


def _node_name(settings: ServerSettings) -> str:
    return settings.peers.name or socket.gethostname().split(".")[0] or "pcrt"


def _chunk_store(
    settings: ServerSettings, ram_bytes: int, store: Store, root: Path
) -> ChunkStore | None:
    if not ram_bytes and not settings.kv_disk_bytes:
        return None
    return ChunkStore(
        store,
        root,
        ram_bytes=ram_bytes,
        disk_bytes=settings.kv_disk_bytes,
        chunk_tokens=settings.kv_chunk_tokens,
    )


def _say_gpu_unused(profile: DeviceProfile) -> None:
    """A GPU this llama.cpp build has no backend for: every layer runs on the CPU, so
    the daemon says so at start, with the command that builds one."""
    command = profile.rebuild_command()
    if command is not None:
        log.warning(
            "%s; every layer runs on the CPU. Build llama.cpp with the %s backend (needs %s): %s",
            profile.cpu_only_reason,
            (profile.missing_backend() or "").upper(),
            BACKEND_NEEDS[profile.missing_backend() or ""],
            command,
        )


def _with_live_profile(
    opener: EngineOpener, monitor: DeviceMonitor, chunks: ChunkStore | None
) -> EngineOpener:
    shared = {"chunks": chunks} if chunks is not None else {}

    def open_with_live_profile(*args: Any, **kwargs: Any) -> EngineClient:
        # plan offload from free memory now, not at start-up
        return opener(*args, profile=monitor.latest, **shared, **kwargs)

    return open_with_live_profile


async def _resume_interrupted(services: Services) -> None:
    """``resume_on_start``: interrupted runs go on once the peers that answer are known;
    resumed before discovery, a node meant for a peer would fail or run here for want of
    one."""
    if services.coordinator.enabled:
        await services.coordinator.settle()
    for run in await services.dags.runs.list_runs(status=RunStatus.INTERRUPTED):
        log.info("resuming DAG run %s", run.id)
        services.dags.start(run.id)


def _engine_lease(pool: ModelPool) -> Callable[[str], AbstractAsyncContextManager[EngineClient]]:
    """DAG nodes take their engine through the pool: loads, keep-alive and limits apply."""

    @contextlib.asynccontextmanager
    async def lease(name: str) -> AsyncIterator[EngineClient]:
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
