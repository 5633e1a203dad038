"""Run and node records: one transaction per change, interrupted runs found at start."""

from __future__ import annotations

import sqlite3

import pytest

from pcrt.cache.runs import (
    NodeCheckpointed,
    NodeFailed,
    NodeFinished,
    NodeRequeued,
    NodeStarted,
    RunCounters,
    RunExists,
    RunNotFound,
    RunStore,
)
from pcrt.cache.store import Store

NODES = [("a", "/dynamic/t/a", "llm"), ("b", "/dynamic/t/b", "fork")]


@pytest.fixture
def runs(store: Store) -> RunStore:
    return RunStore(store)


def test_run_lifecycle(runs: RunStore) -> None:
    run = runs.create_run("r1", "/dynamic/t", {"dag": "/dynamic/t"}, {"x": 1}, NODES)
    assert run.status == "pending" and run.inputs == {"x": 1}
    assert [n.status for n in runs.nodes("r1")] == ["pending", "pending"]
    runs.set_status("r1", "running")
    runs.update_node("r1", "a", NodeStarted(ran_on="here"))
    runs.update_node("r1", "a", NodeCheckpointed("c" * 64, 128))
    runs.finish_node("r1", "a", NodeFinished(output={"k": [1, 2]}, ran_on="here", spent_tokens=200))
    node = runs.node("r1", "a")
    assert node.output == {"k": [1, 2]} and node.checkpoint_tokens == 128 and node.finished_at
    run = runs.get_run("r1")
    assert run.tokens_used == 200 and run.nodes_executed == 1
    runs.set_status("r1", "succeeded")
    assert runs.get_run("r1").finished and runs.get_run("r1").finished_at


def test_a_child_run_is_linked_both_ways_and_listed_on_request(runs: RunStore) -> None:
    runs.create_run("p", "/dynamic/t", {}, {}, NODES)
    child = runs.create_run("c", "/lib/x", {}, {}, [NODES[0]], parent=("p", "b"))
    assert (child.parent_run_id, child.parent_node_id) == ("p", "b")
    assert runs.node("p", "b").child_run_id == "c"
    assert [r.id for r in runs.list_runs()] == ["p"]
    assert sorted(r.id for r in runs.list_runs(children=True)) == ["c", "p"]
    call = NodeFinished(output={}, ran_on="here", spent_tokens=30, executions=4)
    runs.finish_node("p", "b", call)
    assert runs.get_run("p").nodes_executed == 4  # a call counts its child's executions
    with pytest.raises(RunNotFound):  # no orphan: the caller's node must exist
        runs.create_run("c2", "/lib/x", {}, {}, [NODES[0]], parent=("p", "nope"))
    with pytest.raises(RunNotFound):
        runs.get_run("c2")


def test_typed_updates_write_what_happened_and_finishing_returns_the_new_counters(
    runs: RunStore,
) -> None:
    """Each update writes its own fields (a start keeps what it leaves None); a finish
    adds to the run's counters in its transaction and answers with their totals."""
    runs.create_run("t", "/dynamic/t", {}, {}, NODES)
    runs.update_node("t", "a", NodeStarted(ran_on="here", started_at="then", model="m"))
    runs.update_node("t", "a", NodeStarted(ran_on="there", routing={"reason": "r"}))
    node = runs.node("t", "a")
    assert (node.status, node.ran_on, node.started_at, node.model) == (
        "running",
        "there",
        "then",
        "m",
    )
    assert node.routing == {"reason": "r"}
    runs.update_node("t", "a", NodeCheckpointed("c" * 64, 8))
    assert runs.counters("t") == RunCounters(tokens_used=0, nodes_executed=0)
    done = NodeFinished(output="x", ran_on="here", spent_tokens=5, completion_tokens=9)
    assert runs.finish_node("t", "a", done) == RunCounters(tokens_used=5, nodes_executed=1)
    node = runs.node("t", "a")
    assert node.completion_tokens == 9 and node.checkpoint_sha256 == "c" * 64  # kept
    hit = NodeFinished(output=[], ran_on="here", spent_tokens=0, executions=2, cache_hit=True)
    assert runs.finish_node("t", "b", hit) == RunCounters(tokens_used=5, nodes_executed=3)
    assert runs.node("t", "b").cache_hit
    runs.update_node("t", "a", NodeFailed("boom"))
    assert (runs.node("t", "a").status, runs.node("t", "a").error) == ("failed", "boom")
    runs.update_node("t", "b", NodeRequeued())
    assert (runs.node("t", "b").status, runs.node("t", "b").ran_on) == ("pending", None)
    with pytest.raises(RunNotFound):  # nothing half-written: the counters stay
        runs.finish_node("t", "nope", done)
    assert runs.counters("t") == RunCounters(tokens_used=5, nodes_executed=3)


def test_a_failed_create_leaves_nothing(runs: RunStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        runs.create_run("r2", "/dynamic/t", {}, {}, [NODES[0], NODES[0]])  # duplicate node
    with pytest.raises(RunNotFound):
        runs.get_run("r2")
    assert runs.nodes("r2") == []


def test_running_runs_become_interrupted(runs: RunStore) -> None:
    runs.create_run("r3", "/dynamic/t", {}, {}, NODES)
    runs.set_status("r3", "running")
    runs.patch_node("r3", "a", status="succeeded")
    runs.patch_node("r3", "b", status="running")
    assert runs.mark_interrupted() == ["r3"]
    assert runs.get_run("r3").status == "interrupted"
    assert [n.status for n in runs.nodes("r3")] == ["succeeded", "interrupted"]
    assert runs.mark_interrupted() == []


def test_a_subgraph_a_peer_waited_on_is_not_resumed_after_a_crash(runs: RunStore) -> None:
    """The peer's call died with the daemon and it ran the work elsewhere: resuming the
    run here would compute what no one reads."""
    runs.create_run("p", "/dynamic/t", {}, {}, NODES)
    runs.mark_for_peer("p", "edge-1")
    runs.set_status("p", "running")
    runs.patch_node("p", "a", status="running")
    assert runs.mark_interrupted() == []  # nothing to resume
    record = runs.get_run("p")
    assert record.status == "cancelled" and record.for_peer == "edge-1"
    assert record.error is not None and "edge-1" in record.error
    assert runs.nodes("p")[0].status == "interrupted"  # its checkpoint stays usable


def test_unknown_records_and_fields(runs: RunStore) -> None:
    with pytest.raises(RunNotFound):
        runs.set_status("nope", "running")
    runs.create_run("r4", "/dynamic/t", {}, {}, NODES)
    with pytest.raises(ValueError, match="unknown node fields"):
        runs.patch_node("r4", "a", colour="red")


def test_subgraph_cache_is_bounded_lru(runs: RunStore) -> None:
    """Least recently used, not first in: a read keeps the oldest entry alive."""
    runs.cache_put("k0", "/lib/x", {"i": 0}, tokens=5, max_entries=2)
    runs.cache_put("k1", "/lib/x", {"i": 1}, tokens=5, max_entries=2)
    assert runs.cache_get("k0") == {"i": 0}  # the oldest insert, now the latest use
    runs.cache_put("k2", "/lib/x", {"i": 2}, tokens=5, max_entries=2)
    assert runs.cache_get("k1") is None  # untouched since its insert: evicted
    assert runs.cache_get("k0") == {"i": 0}  # FIFO would have dropped this one
    assert runs.cache_get("k2") == {"i": 2}
    # and again, the other way round: k2 was read last, so k0 goes
    runs.cache_put("k3", "/lib/x", {"i": 3}, tokens=5, max_entries=2)
    assert runs.cache_get("k0") is None
    assert runs.cache_get("k2") == {"i": 2} and runs.cache_get("k3") == {"i": 3}


def test_a_run_moved_away_and_back_replaces_its_old_record(runs: RunStore) -> None:
    """A -> B -> A: the record A kept as "migrated" gives way to the one coming back; any
    other run with that id is never overwritten; a crash mid-move leaves it resumable."""
    runs.create_run("m", "/dynamic/t", {"dag": "/dynamic/t"}, {}, NODES)
    runs.set_status("m", "migrating")
    assert runs.mark_interrupted() == ["m"]  # the daemon died mid-move
    runs.set_status("m", "migrated", migrated_to="b:http://b/v1/dags/m")
    back = {
        "id": "m",
        "dag_path": "/dynamic/t",
        "spec": {"dag": "/dynamic/t"},
        "inputs": {},
        "tokens_used": 7,
        "agent": "planner",
    }
    nodes = [
        {
            "node_id": "a",
            "path": "/dynamic/t/a",
            "type": "llm",
            "status": "succeeded",
            "output": "hi",
        },
        {"node_id": "b", "path": "/dynamic/t/b", "type": "fork", "status": "running"},
    ]
    record, fresh = runs.import_run(back, nodes, origin="b")
    assert fresh and record.status == "interrupted" and record.tokens_used == 7
    assert record.origin == "b" and record.agent == "planner"  # still billed to its agent
    assert [n.status for n in runs.nodes("m")] == ["succeeded", "interrupted"]
    with pytest.raises(RunExists, match="moved from b, not c"):
        runs.import_run(back, nodes, origin="c")  # it is here and unfinished: not overwritten


def test_a_repeated_import_changes_nothing_and_another_run_under_its_id_is_refused(
    runs: RunStore,
) -> None:
    """A sender that lost the answer sends the same run again: it gets the record as it
    stands. Another DAG or other inputs under that id, or a run started here, conflict."""
    moved = {
        "id": "r",
        "dag_path": "/dynamic/t",
        "spec": {"dag": "/dynamic/t", "n": 1},
        "inputs": {"x": 1},
    }
    nodes = [{"node_id": "a", "path": "/dynamic/t/a", "type": "llm", "status": "pending"}]
    first, fresh = runs.import_run(moved, nodes, origin="a")
    assert fresh
    runs.set_status("r", "running")  # the peer resumed it meanwhile
    runs.patch_node("r", "a", status="succeeded", output="done")
    again, fresh = runs.import_run(moved, [{**nodes[0], "status": "running"}], origin="a")
    assert not fresh and again.id == first.id and again.status == "running"
    assert runs.node("r", "a").output == "done"  # the repeat's nodes are not written

    with pytest.raises(RunExists, match="another DAG or inputs"):
        runs.import_run({**moved, "inputs": {"x": 2}}, nodes, origin="a")
    with pytest.raises(RunExists, match="another DAG or inputs"):
        runs.import_run({**moved, "spec": {"dag": "/dynamic/t", "n": 2}}, nodes, origin="a")
    runs.create_run("local", "/dynamic/t", {"dag": "/dynamic/t"}, {}, NODES)
    with pytest.raises(RunExists, match="started on this node"):
        runs.import_run({**moved, "id": "local"}, nodes, origin="a")
