"""moving.py: a move is all or nothing, even when the daemon stops in the middle of it,
and whoever waits on the run is told where it went."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.routing.migrate import Migration
from pcrt.runtime.dag.tasks import DagTasks
from pcrt.runtime.errors import InvalidRequest, PeerUnavailable
from pcrt.runtime.server import moving


@pytest.fixture
def runs(store: Store) -> RunStore:
    runs = RunStore(store)
    runs.create_run("r", "/dynamic/t", {"dag": "/dynamic/t"}, {}, [("a", "/dynamic/t/a", "llm")])
    return runs


def _services(runs: RunStore) -> Any:
    # move_run reads the run store and the DAG tasks; the sending is a fake (below)
    return SimpleNamespace(
        dags=DagTasks(SimpleNamespace(runs=runs)), coordinator=None, blobs=None, chunks=None
    )


def _slow_migration(seconds: float, fails: bool = False) -> Any:
    async def migrate_run(*args: Any, **kw: Any) -> Migration:
        await asyncio.sleep(seconds)
        if fails:
            raise PeerUnavailable("the peer went away", peer="p")
        return Migration(run_id="r", peer="p", peer_url="http://p", peer_status="running")

    return migrate_run


async def test_a_move_cut_short_by_shutdown_is_finished_first(runs: RunStore) -> None:
    """Cancelled mid-send, the move completes and is recorded before the cancellation goes
    on: the peer has the run, so here it must say "migrated", not "interrupted" (which a
    restart would resume: the run would run twice)."""
    services = _services(runs)
    move = asyncio.ensure_future(
        moving.move_run(services, "r", "p", with_states=True, migrate=_slow_migration(0.3))
    )
    await asyncio.sleep(0.1)
    assert runs.get_run("r").status == "migrating" and "r" in services.dags.moves
    move.cancel()
    with pytest.raises(asyncio.CancelledError):
        await move
    record = runs.get_run("r")
    assert record.status == "migrated" and record.migrated_to == "p:http://p/v1/dags/r"
    assert not services.dags.moves


async def test_a_failed_move_leaves_the_run_resumable_and_wakes_its_waiters(
    runs: RunStore,
) -> None:
    failing = _slow_migration(0.2, fails=True)
    services = _services(runs)
    move = asyncio.ensure_future(
        moving.move_run(services, "r", "p", with_states=True, migrate=failing)
    )
    await asyncio.sleep(0.05)
    waiter = asyncio.ensure_future(services.dags.outcome("r"))  # as a wait=true client
    with pytest.raises(InvalidRequest, match="moving already"):
        await moving.move_run(services, "r", "q", with_states=True, migrate=failing)
    with pytest.raises(PeerUnavailable):
        await move
    record = await asyncio.wait_for(waiter, 5)
    assert record.status == "interrupted" and "the peer went away" in (record.error or "")


async def test_a_run_for_a_peer_does_not_move(runs: RunStore) -> None:
    services = _services(runs)
    runs.mark_for_peer("r", "edge")
    with pytest.raises(InvalidRequest, match="for a peer"):
        await moving.move_run(services, "r", "p", with_states=True)
    assert services.dags.movable() == [] and runs.get_run("r").status == "pending"


async def test_stopping_a_run_does_not_swallow_the_stoppers_own_cancellation(
    runs: RunStore,
) -> None:
    """A shutdown cancels the battery watcher while it waits for a run to stop: that
    cancellation must reach the watcher, or the shutdown would wait on it forever."""
    services = _services(runs)
    dags = services.dags
    stopping = asyncio.Event()

    async def run_that_stops_slowly() -> Any:
        try:
            await asyncio.sleep(30)
        finally:
            stopping.set()
            await asyncio.sleep(0.2)  # writing its checkpoint, say

    dags.tasks["r"] = asyncio.ensure_future(run_that_stops_slowly())
    await asyncio.sleep(0)
    watcher = asyncio.ensure_future(dags.cancel("r"))
    await stopping.wait()
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    await asyncio.wait({dags.tasks["r"]})
