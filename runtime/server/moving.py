"""Moving this daemon's DAG runs to pcrt peers: one run when asked, or every running one
when the daemon drains (``migrate_on_drain``) or its battery runs low
(``migrate_on_battery``, ``battery_watch.py``).

A moving run is stopped first (its checkpoints are on disk) and held as ``migrating``, so
no resume or second move starts meanwhile; a failed move leaves it ``interrupted`` here,
resumable. ``routing.migrate`` does the sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pcrt.cache.async_runs import AsyncRunStore
from pcrt.cache.runs import RunStore
from pcrt.cache.status import RESUMABLE_RUN_STATES, NodeStatus, RunStatus
from pcrt.cache.tool_calls import ToolCallStore
from pcrt.routing.migrate import Migration, migrate_run
from pcrt.routing.policy import Work
from pcrt.runtime.errors import InvalidRequest, PcrtError
from pcrt.runtime.server.services import DaemonState, Services
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["Drain", "MigrateRun", "move_run", "move_running_runs"]

log = logging.getLogger(__name__)

MigrateRun = Callable[..., Awaitable[Migration]]
"""What sends a stopped run to a peer: ``routing.migrate.migrate_run``'s signature."""


async def move_run(
    services: Services,
    run_id: str,
    peer: str,
    *,
    with_states: bool,
    migrate: MigrateRun = migrate_run,
) -> Migration:
    """Stop the run, hold it as ``migrating``, move it to ``peer``; on failure it is
    ``interrupted`` here again. A move under way finishes even when its caller is
    cancelled. Runs a peer waits on (partial runs) never move. ``migrate``: what does
    the sending (tests pass a fake peer's)."""
    dags = services.dags
    runs = dags.runs
    if (await runs.get_run(run_id)).for_peer is not None:
        raise InvalidRequest(f"run {run_id} runs here for a peer that waits on it; it stays")
    if await to_thread_to_completion(calls_tools_here, runs.sync, run_id):
        raise InvalidRequest(
            f"run {run_id} has tool calls under way here, recorded here; it stays (a peer "
            "would send them again)"
        )
    if run_id in dags.moves:
        raise InvalidRequest(f"run {run_id} is moving already")
    moved = dags.moves[run_id] = asyncio.Event()  # waiters on the run wait for the move
    try:
        await dags.cancel(run_id)
        status = (await runs.get_run(run_id)).status
        # it finished before it stopped: nothing left to move
        if status not in RESUMABLE_RUN_STATES:
            raise InvalidRequest(f"run {run_id} is {status}; only unfinished runs move")
        await runs.set_status(run_id, RunStatus.MIGRATING, error=f"moving to peer {peer}")
        sending = asyncio.ensure_future(
            migrate(
                services.coordinator,
                runs,
                services.blobs,
                run_id,
                peer,
                with_states=with_states,
                chunks=services.chunks,
            )
        )
        try:
            # a daemon stopping mid-move finishes the move first: cut short, the peer
            # could hold the run while it also stays resumable here (it would run twice).
            # (wait, unlike await, leaves ``sending`` running when we are cancelled)
            await asyncio.wait({sending})
        except asyncio.CancelledError:
            await asyncio.wait({sending})
            with contextlib.suppress(Exception):  # recorded; the cancellation goes on
                await _record_move(runs, run_id, peer, sending)
            raise
        return await _record_move(runs, run_id, peer, sending)
    finally:
        del dags.moves[run_id]
        moved.set()


async def _record_move(
    runs: AsyncRunStore, run_id: str, peer: str, sending: asyncio.Future[Migration]
) -> Migration:
    """The run is ``migrated`` (with its pointer) or, when the move failed, ``interrupted``
    here again; the move's result or error."""
    exc = sending.exception()
    if exc is not None:
        await runs.set_status(
            run_id, RunStatus.INTERRUPTED, error=f"the move to {peer} failed: {exc}"
        )
        raise exc
    result = sending.result()
    await runs.set_status(
        run_id, RunStatus.MIGRATED, error=f"moved to peer {result.peer}", migrated_to=result.pointer
    )
    return result


def calls_tools_here(runs: RunStore, run_id: str) -> bool:
    """Whether the run has tool or agent work begun here and not finished: its calls'
    records are here, and a peer resuming it would send them again."""
    calls = ToolCallStore(runs.store)
    for node in runs.nodes(run_id):
        if node.status == NodeStatus.SUCCEEDED:
            continue  # done: the peer takes its output, it never runs again
        if node.type in ("tool", "agent") and calls.of_node(run_id, node.node_id):
            return True
        if node.child_run_id is not None and calls.of_tree(node.child_run_id):
            return True  # a subgraph call whose child run called tools
    return False


async def move_running_runs(services: Services, why: str, *, resume_unmoved: bool) -> list[str]:
    """Move each running DAG run to the best trusted pcrt peer with its model (the next
    candidate when a move fails); the ids moved. ``resume_unmoved``: a run that could not
    move goes on here (a daemon that keeps serving); else it stays interrupted (a daemon
    that is stopping: resume continues it later)."""
    moved = []
    for run_id in services.dags.movable():
        work = Work(
            model=await _run_model(services.dags.runs, run_id),
            route="peer",
            peer_kinds=frozenset({"pcrt"}),
        )
        decision = services.coordinator.decide(work, include_local=False)
        for candidate in decision.candidates:
            try:
                result = await move_run(services, run_id, candidate.node, with_states=True)
            except PcrtError as exc:
                log.warning("run %s could not move to %s: %s", run_id, candidate.node, exc)
                continue
            except Exception:  # a bug in one move must not stop the others, or the drain
                log.exception("run %s could not move to %s", run_id, candidate.node)
                continue
            log.info(
                "%s: run %s moved to %s (%d states sent; left: %s)",
                why,
                run_id,
                result.peer,
                result.states_sent,
                "; ".join(result.states_left) or "none",
            )
            moved.append(run_id)
            break
        else:
            reason = "every move failed" if decision.candidates else decision.reason
            log.warning("%s: run %s stays here: %s", why, run_id, reason)
            if (
                resume_unmoved
                and (await services.dags.runs.get_run(run_id)).status in RESUMABLE_RUN_STATES
            ):
                services.dags.start(run_id)
    return moved


async def _run_model(runs: AsyncRunStore, run_id: str) -> str | None:
    """The model the run used last (its states are that model's), or None when no node
    has started yet: then any pcrt peer's best model will do."""
    models = [n.model for n in await runs.nodes(run_id) if n.model and n.started_at]
    return models[-1] if models else None


class Drain:
    """The daemon stopping: admit no new requests and, with ``migrate_on_drain``, move the
    running runs to peers at once, so that clients waiting on them are answered
    "migrated" instead of holding the shutdown (uvicorn waits for open connections before
    the lifespan ends). Begun by SIGTERM (``cli/serve.py``) or by the lifespan's end,
    whichever comes first. The battery watcher stops first: one mover at a time."""

    def __init__(self, services: Services, battery_watcher: asyncio.Task[None] | None) -> None:
        self.services = services
        self.battery_watcher = battery_watcher
        self._moves: asyncio.Task[list[str]] | None = None

    def begin(self) -> None:
        """Idempotent; on the event loop."""
        self.services.state = DaemonState.DRAINING
        self.services.pool.start_draining()
        self.services.dags.end_watches()  # open dashboard tabs must not hold the shutdown
        if self._moves is None and self.services.settings.peers.migrate_on_drain:
            self._moves = asyncio.create_task(self._move(), name="pcrt-drain-moves")

    async def finish(self) -> list[str]:
        """Begin (if SIGTERM did not) and wait for the moves; the ids moved."""
        self.begin()
        await self._stop_battery_watcher()
        return await self._moves if self._moves is not None else []

    async def _move(self) -> list[str]:
        await self._stop_battery_watcher()
        return await move_running_runs(self.services, "draining", resume_unmoved=False)

    async def _stop_battery_watcher(self) -> None:
        if self.battery_watcher is not None:
            self.battery_watcher.cancel()  # a move it has under way finishes first
            with contextlib.suppress(asyncio.CancelledError):
                await self.battery_watcher
