"""The event loop never waits on SQLite (issue 16, item 2).

A store call can take as long as another thread holds the store's lock (a checkpoint's
record being written), another connection holds the write lock (a run's commit, a WAL
checkpoint) or, for a run of 1,000 nodes, its rows take to decode. Each test holds the
store for 2 s while the daemon works, and the loop (a ticker, or ``/health`` through
``HealthProbe``) must go on answering within a fraction of that: run records awaited in
worker threads (``AsyncRunStore``), run answers read and encoded in one, usage rows
queued for the log's writer thread, the models' speeds refreshed in the background."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from pcrt.cache.async_runs import AsyncRunStore
from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import NodeFinished, NodeStarted, RunStore
from pcrt.cache.store import BenchRecord, Store
from pcrt.cache.usage import UsageLog, UsageRecord
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.engine import EngineClient
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.node_info import NodeInfo
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngine, FakeEngines
from tests.health_probe import HealthProbe, loop_gaps
from tests.homes import isolated_paths
from tests.live_server import LiveServer, ServerFactory

HELD = 2.0  # seconds the store is held
LOOP_BOUND = 0.5  # the longest the loop may go unanswered meanwhile (generous: shared cores)


class _Holder:
    """Something held by another thread for ``seconds`` from the moment the block enters
    (``with``, or ``async with`` on the loop, whose exit then awaits the thread); the
    exit waits for it to be let go."""

    def __init__(self, hold: Callable[[threading.Event], None]) -> None:
        self._taken = threading.Event()
        self._thread = threading.Thread(target=hold, args=(self._taken,), name="test-holder")

    def __enter__(self) -> None:
        self._thread.start()
        assert self._taken.wait(5)

    def __exit__(self, *_: object) -> None:
        self._thread.join()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *_: object) -> None:
        await asyncio.to_thread(self._thread.join)


def lock_held(lock: Any, seconds: float = HELD) -> _Holder:
    """The store's ``lock``, taken by another thread (as one writing a record holds it)."""

    def hold(taken: threading.Event) -> None:
        with lock:
            taken.set()
            time.sleep(seconds)

    return _Holder(hold)


def write_lock_held(db_path: Path, seconds: float = HELD) -> _Holder:
    """Another connection's write transaction on the database: every other writer waits
    for it (SQLite's busy timeout), as for a run's commit or a WAL checkpoint."""

    def hold(taken: threading.Event) -> None:
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute("begin immediate")
            taken.set()
            time.sleep(seconds)
            conn.execute("commit")
        finally:
            conn.close()

    return _Holder(hold)


# -- the run store's facade -------------------------------------------------------------


class _ThreadsSeen(RunStore):
    """A run store that notes the thread of every call and each node update, in order."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.threads: set[int] = set()
        self.writes: list[tuple[str, str]] = []  # (node id, what happened)

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if not inspect.ismethod(attr) or name.startswith("_"):
            return attr
        threads = super().__getattribute__("threads")

        @functools.wraps(attr)
        def called(*args: Any, **kwargs: Any) -> Any:  # noted where it runs, not where named
            threads.add(threading.get_ident())
            return attr(*args, **kwargs)

        return called

    def update_node(self, run_id: str, node_id: str, update: Any) -> None:
        self.writes.append((node_id, type(update).__name__))
        super().update_node(run_id, node_id, update)

    def finish_node(self, run_id: str, node_id: str, finished: NodeFinished) -> Any:
        self.writes.append((node_id, "NodeFinished"))
        return super().finish_node(run_id, node_id, finished)


async def test_every_call_of_the_async_run_store_runs_in_a_worker_thread(store: Store) -> None:
    seen = _ThreadsSeen(store)
    runs = AsyncRunStore(seen)
    seen.threads.clear()
    nodes = [("a", "/d/a", "llm"), ("b", "/d/b", "assert")]
    await runs.create_run("r", "/d", {"dag": "/d"}, {}, nodes, agent="x")
    await runs.update_node("r", "a", NodeStarted(ran_on="local"))
    finished = NodeFinished(output="hi", ran_on="local", spent_tokens=3)
    assert (await runs.finish_node("r", "a", finished)).tokens_used == 3
    record, records = await runs.run_with_nodes("r")
    assert record.id == "r" and [n.node_id for n in records] == ["a", "b"]
    assert (await runs.node("r", "a")).output == "hi"
    assert [n.status for n in await runs.nodes("r")] == ["succeeded", "pending"]
    assert (await runs.counters("r")).nodes_executed == 1
    # a node that finished is counted once: in the counters, not among the unfinished
    totals, unfinished = await runs.counters_and_unfinished("r", ["a", "b"])
    assert (totals.nodes_executed, unfinished) == (1, 1)
    await runs.set_status("r", "running")
    await runs.mark_for_peer("r", "edge")
    assert [r.id for r in await runs.list_runs()] == ["r"]
    assert await runs.mark_interrupted() == []  # a peer's: cancelled, not resumable
    assert (await runs.get_run("r")).status == "cancelled"
    await runs.cache_put("k", "/d", {"x": 1}, 3, 10)
    assert await runs.cache_get("k") == {"x": 1}
    moved = {"id": "m", "dag_path": "/d", "spec": {"dag": "/d"}, "inputs": {}}
    assert (await runs.import_run(moved, [], origin="p"))[1] is True
    assert threading.get_ident() not in seen.threads
    assert seen.threads  # it was called, elsewhere


# -- the executor --------------------------------------------------------------------------


def _runner(store: Store, runs: RunStore, tmp_path: Path, engine: EngineClient) -> DagRunner:
    @contextlib.asynccontextmanager
    async def lease(name: str) -> AsyncIterator[EngineClient]:
        yield engine

    registry = Registry.load(isolated_paths(tmp_path / "home"))
    blobs = BlobStore(store, tmp_path / "blobs")
    return DagRunner(registry=registry, runs=runs, blobs=blobs, lease=lease, library_dirs=())


GENERATIONS = {
    "dag": "/dynamic/held",
    "budget": {"max_nodes": 10, "max_tokens": 1000},
    "nodes": {
        "first": {"type": "llm", "tag": "simple", "prompt": "Hi.", "max_tokens": 4},
        "second": {"type": "llm", "tag": "simple", "prompt": "Hello.", "max_tokens": 4},
        "check": {"type": "assert", "that": "nodes.first.output | length > 0"},
        "last": {
            "type": "llm",
            "tag": "simple",
            "prompt": "{{ nodes.second.output }}",
            "max_tokens": 4,
        },
    },
}


async def test_a_dag_run_leaves_the_loop_free_while_the_store_is_held(
    store: Store, tmp_path: Path
) -> None:
    """Every record the run reads and writes (its start, each node's start and finish,
    its counters for the budget, its end) waits for the store in a worker thread; the
    loop ticks on. And each node's records are written in the order its code awaits
    them: started, then finished."""
    runs = _ThreadsSeen(store)
    engine = FakeEngine("smollm2-135m")
    runner = _runner(store, runs, tmp_path, engine)
    run = runner.create(parse_dag(GENERATIONS), {})
    runs.threads.clear()
    async with loop_gaps() as gaps, lock_held(store.lock):
        started = time.perf_counter()
        final = await runner.execute(run.id)
        took = time.perf_counter() - started
    assert final.status == "succeeded", final.error
    assert took >= HELD - 0.2  # it did wait for the store
    assert max(gaps) < LOOP_BOUND, f"the loop stalled {max(gaps):.2f} s"
    assert threading.get_ident() not in runs.threads
    for node in ("first", "second", "last"):
        assert [w for n, w in runs.writes if n == node] == ["NodeStarted", "NodeFinished"]
    assert [w for n, w in runs.writes if n == "check"] == ["NodeFinished"]


# -- the daemon ----------------------------------------------------------------------------


@pytest.fixture
def server(live_server: ServerFactory) -> LiveServer:
    return live_server(ServerSettings(), opener=FakeEngines())


def _db_path(server: LiveServer) -> Path:
    return server.services.pool.registry.paths.db_path


def _store_lock(server: LiveServer) -> Any:
    return server.services.dags.runner.runs.store.lock


def test_a_dag_run_through_the_daemon_leaves_health_fast_while_the_store_is_held(
    server: LiveServer,
) -> None:
    """Creating the run (validation and records in one worker thread), executing it and
    billing its generations: /health answers throughout."""
    with HealthProbe(server.url) as probe, lock_held(_store_lock(server)):
        r = httpx.post(server.url + "/v1/dags", json={"dag": GENERATIONS}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    assert probe.failures == []
    assert probe.worst < LOOP_BOUND, probe.report("a DAG run, the store held")
    billed = server.services.usage.rows(agent="anonymous")
    assert sum(row["route"] == "/v1/dags" for row in billed) == 3


def test_reading_runs_leaves_health_fast_while_the_store_is_held(server: LiveServer) -> None:
    """``GET /v1/dags/ID`` (a run and its nodes, decoded and encoded) and the listing
    wait for the store in a worker thread."""
    doc = {
        "dag": "/dynamic/asserts",
        "nodes": {f"a{i}": {"type": "assert", "that": "true"} for i in range(50)},
    }
    created = httpx.post(server.url + "/v1/dags", json={"dag": doc}, timeout=60)
    assert created.status_code == 200, created.text
    run_id = created.json()["id"]
    with (
        HealthProbe(server.url) as probe,
        ThreadPoolExecutor(2) as pool,
        lock_held(_store_lock(server)),
    ):
        one = pool.submit(httpx.get, f"{server.url}/v1/dags/{run_id}", timeout=60)
        listed = pool.submit(httpx.get, f"{server.url}/v1/dags", timeout=60)
        time.sleep(HELD / 2)
        assert not one.done() and not listed.done()  # waiting for the store, off the loop
    assert one.result().status_code == 200 and len(one.result().json()["nodes"]) == 50
    assert one.result().json() == created.json()  # the same answer as the route gave
    assert [r["id"] for r in listed.result().json()["data"]] == [run_id]
    assert probe.failures == []
    assert probe.worst < LOOP_BOUND, probe.report("reading runs, the store held")
    missing = httpx.get(f"{server.url}/v1/dags/nope", timeout=10)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_a_usage_row_waits_for_the_database_off_the_loop(server: LiveServer) -> None:
    """A request's usage row is queued; the log's writer thread waits for the database
    while another connection holds its write lock, the request is answered at once, and
    a read of the log sees the row once written."""
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"X-PC-Agent-ID": "held"}
    with HealthProbe(server.url) as probe, write_lock_held(_db_path(server)):
        started = time.perf_counter()
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={**body, "max_tokens": 3},
            headers=headers,
            timeout=60,
        )
        answered = time.perf_counter() - started
    assert r.status_code == 200, r.text
    assert answered < HELD / 2  # not held up by its own accounting
    assert probe.failures == []
    assert probe.worst < LOOP_BOUND, probe.report("a usage row, the database locked")
    rows = server.services.usage.rows(agent="held")
    assert [(row["status"], row["completion_tokens"]) for row in rows] == [(200, 3)]


# -- the usage log's writer ------------------------------------------------------------------


def _row(agent: str, n: int) -> UsageRecord:
    return UsageRecord(agent=agent, model="m", route="/r", status=200, completion_tokens=n)


def test_queued_usage_rows_are_written_in_order_and_before_the_log_closes(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    log = UsageLog(store)
    for n in range(200):
        log.record_soon(_row("a", n))
    assert [r["completion_tokens"] for r in log.rows(agent="a")] == list(range(200))
    with write_lock_held(Path(store.path), seconds=0.5):
        log.record_soon(_row("b", 1))  # returns at once; the writer waits
    log.close()  # what is queued is written first
    reader = UsageLog(store)
    assert [r["completion_tokens"] for r in reader.rows(agent="b")] == [1]
    log.record_soon(_row("c", 1))  # closed: said, not written
    assert "usage log closed" in caplog.text
    assert reader.rows(agent="c") == []


# -- what the node offers peers ---------------------------------------------------------------


async def test_node_views_on_the_loop_do_not_read_the_store(store: Store, tmp_path: Path) -> None:
    """A routing decision builds the node's view on the loop: a stale speed is not read
    there (the bench results wait for the store) but refreshed in a worker thread, and
    the next view has it."""
    registry = Registry.load(isolated_paths(tmp_path / "home"))
    entry = registry.resolve(None)
    assert entry.sha256 is not None
    store.add_bench_result(
        BenchRecord(
            model_sha256=entry.sha256,
            model=entry.name,
            fingerprint="f",
            plan_key="p",
            n_threads=1,
            plan_json="{}",
            prompt_tokens=1,
            prefill_seconds=1.0,
            prefill_tps=900.0,
            decode_tokens=1,
            decode_seconds=1.0,
            decode_tps=42.0,
            llama_cpp_version="v",
            measured_at="2026-01-01T00:00:00+00:00",
        )
    )
    pool = SimpleNamespace(loaded=list)
    node = NodeInfo("n", "here", registry, pool, SimpleNamespace(), store)
    async with loop_gaps() as gaps, lock_held(store.lock):
        offers = {o.name: o for o in node.offers()}
        assert offers[entry.name].tokens_per_s is None  # not read yet, and not waited for
        await asyncio.sleep(HELD / 2)
    assert max(gaps) < LOOP_BOUND, f"the loop stalled {max(gaps):.2f} s"
    assert node._refreshing is not None
    await node._refreshing  # the refresh the view asked for, once the store was free
    offer = next(o for o in node.offers() if o.name == entry.name)
    assert (offer.tokens_per_s, offer.prefill_tokens_per_s) == (42.0, 900.0)
    await node.close()
