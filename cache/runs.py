"""DAG runs and node records, written so that a crash at any instant leaves them consistent.

Every change is one SQLite transaction, and blobs are stored (fsynced, renamed) before a
record names them. A run the daemon was executing when it died still says ``running``;
``mark_interrupted`` turns those into ``interrupted`` at start-up, and a resume picks up
each node from its record: finished nodes keep their outputs, an interrupted node its
last checkpoint.

What happens to a node is written by ``update_node`` with one of the typed updates
(``NodeStarted``, ``NodeRouted``, ``NodeCheckpointed``, ``NodeFailed``, ``NodeRequeued``,
``NodeInterrupted``, ``NodeFinishedElsewhere``), and its successful end by ``finish_node``
with a ``NodeFinished``, which adds to the run's counters in the same transaction and
returns their new totals: the counters in ``runs`` are the run's one count of what it
spent. ``patch_node`` writes any fields, checked at run time: for tests that stage a
record and for repairs, never for the executor.

Every method blocks (a statement, the store's lock, a commit's fsync): code on the event
loop awaits them through ``AsyncRunStore`` (``async_runs.py``), which runs each in a
worker thread.

A subgraph call runs as a child run: its record names the calling run and node
(``parent_run_id``, ``parent_node_id``) and the calling node's record names the child
(``child_run_id``), both written in the transaction that creates the child. Listings show
top-level runs unless asked for children: a child is resumed through its parent.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeAlias

from pcrt.cache.status import FINISHED_RUN_STATES, NodeStatus, RunStatus
from pcrt.cache.store import Store, utc_now

__all__ = [
    "NodeCheckpointed",
    "NodeFailed",
    "NodeFinished",
    "NodeFinishedElsewhere",
    "NodeInterrupted",
    "NodeRecord",
    "NodeRequeued",
    "NodeRouted",
    "NodeStarted",
    "NodeUpdate",
    "RunCounters",
    "RunExists",
    "RunNotFound",
    "RunRecord",
    "RunStore",
]


class RunExists(ValueError):
    pass


class RunNotFound(KeyError):
    pass


@dataclass(frozen=True)
class RunRecord:
    id: str
    dag_path: str
    spec: dict[str, Any]
    inputs: dict[str, Any]
    status: RunStatus
    error: str | None
    tokens_used: int
    nodes_executed: int
    created_at: str
    updated_at: str
    finished_at: str | None
    migrated_to: str | None
    parent_run_id: str | None = None  # a subgraph call's run: the caller's run and node
    parent_node_id: str | None = None
    origin: str | None = None  # a run moved here: the node it came from
    for_peer: str | None = None  # a subgraph a peer sent and waits on: that peer
    agent: str | None = None  # whom the run's generations are billed to (usage rows)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_RUN_STATES

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRecord:
        row = dict(row)
        row["spec"] = json.loads(row["spec"])
        row["inputs"] = json.loads(row["inputs"])
        row["status"] = RunStatus(row["status"])
        row["tokens_used"] = row["tokens_used"] or 0
        row["nodes_executed"] = row["nodes_executed"] or 0
        return cls(**row)


@dataclass(frozen=True)
class NodeRecord:
    run_id: str
    node_id: str
    path: str
    type: str
    status: NodeStatus
    output: Any
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    started_at: str | None
    finished_at: str | None
    seconds: float | None
    ran_on: str | None
    model: str | None
    state_sha256: str | None
    checkpoint_sha256: str | None
    checkpoint_tokens: int | None
    cache_hit: bool
    resumed_from_checkpoint: bool
    error: str | None
    routing: Any = None  # where the node was sent and why, failed attempts first
    child_run_id: str | None = None  # a subgraph node: the run of the DAG it calls

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> NodeRecord:
        row = dict(row)
        row["status"] = NodeStatus(row["status"])
        row["output"] = json.loads(row["output"]) if row["output"] is not None else None
        row["routing"] = json.loads(row["routing"]) if row.get("routing") else None
        row["cache_hit"] = bool(row["cache_hit"])
        row["resumed_from_checkpoint"] = bool(row["resumed_from_checkpoint"])
        return cls(**row)


_NODE_FIELDS = {f.name for f in fields(NodeRecord)}


@dataclass(frozen=True)
class RunCounters:
    """What a run has spent: tokens generated and node executions (a subgraph call counts
    its child run's)."""

    tokens_used: int
    nodes_executed: int


# -- what happens to a node: one typed update per event ------------------------------------


@dataclass(frozen=True, kw_only=True)
class NodeStarted:
    """The node runs (again), on ``ran_on``. A field left None keeps what the record says
    (a resumed call keeps its first start; a fork says nothing of checkpoints)."""

    ran_on: str
    started_at: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    resumed_from_checkpoint: bool | None = None
    routing: dict[str, Any] | None = None  # where it was sent and why

    def columns(self) -> dict[str, Any]:
        given = {
            "started_at": self.started_at,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "resumed_from_checkpoint": self.resumed_from_checkpoint,
            "routing": _json(self.routing),
        }
        kept = {name: value for name, value in given.items() if value is not None}
        return {"status": NodeStatus.RUNNING, "ran_on": self.ran_on, **kept}


@dataclass(frozen=True)
class NodeRouted:
    """Where routing sent the node, and why (a local candidate: it runs here)."""

    routing: dict[str, Any]

    def columns(self) -> dict[str, Any]:
        return {"routing": _json(self.routing)}


@dataclass(frozen=True)
class NodeCheckpointed:
    """The node's newest checkpoint: its KV state's blob and the tokens it had generated."""

    checkpoint_sha256: str
    checkpoint_tokens: int

    def columns(self) -> dict[str, Any]:
        return {
            "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoint_tokens": self.checkpoint_tokens,
        }


@dataclass(frozen=True)
class NodeFailed:
    error: str

    def columns(self) -> dict[str, Any]:
        return {"status": NodeStatus.FAILED, "error": self.error}


@dataclass(frozen=True)
class NodeRequeued:
    """Back to waiting, nowhere: the peer it went to with its group failed, and the next
    candidate decides for it."""

    def columns(self) -> dict[str, Any]:
        return {"status": NodeStatus.PENDING, "ran_on": None}


@dataclass(frozen=True)
class NodeInterrupted:
    """It was running when its run stopped with no daemon left to say so."""

    def columns(self) -> dict[str, Any]:
        return {"status": NodeStatus.INTERRUPTED}


@dataclass(frozen=True, kw_only=True)
class NodeFinishedElsewhere:
    """Done before this run began, on ``ran_on`` (a peer that sends part of a DAG ran it):
    its output is recorded, and nothing is added to this run's counters (the run that did
    the work counted it)."""

    output: Any
    ran_on: str

    def columns(self) -> dict[str, Any]:
        return {
            "status": NodeStatus.SUCCEEDED,
            "output": json.dumps(self.output),
            "ran_on": self.ran_on,
            "finished_at": utc_now(),
        }


NodeUpdate: TypeAlias = (
    NodeStarted
    | NodeRouted
    | NodeCheckpointed
    | NodeFailed
    | NodeRequeued
    | NodeInterrupted
    | NodeFinishedElsewhere
)


@dataclass(frozen=True, kw_only=True)
class NodeFinished:
    """A node's execution succeeded: its final record, and what it adds to its run's
    counters (``spent_tokens``, the tokens this execution generated, which a resumed
    node's ``completion_tokens`` exceeds by those generated before; ``executions``, one,
    or a subgraph call's child run's). Every field is written: None is NULL. Its
    ``routing``, ``error``, ``resumed_from_checkpoint`` and checkpoint stay as they are,
    unless ``drops_checkpoint`` (a cache hit, which has no checkpoint of its own)."""

    output: Any
    ran_on: str
    spent_tokens: int
    executions: int = 1
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    seconds: float | None = None
    cache_hit: bool = False
    state_sha256: str | None = None
    drops_checkpoint: bool = False

    def columns(self) -> dict[str, Any]:
        values = {
            "status": NodeStatus.SUCCEEDED,
            "output": json.dumps(self.output),
            "ran_on": self.ran_on,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "seconds": self.seconds,
            "cache_hit": int(self.cache_hit),
            "state_sha256": self.state_sha256,
            "finished_at": utc_now(),
        }
        if self.drops_checkpoint:
            values["checkpoint_sha256"] = None
        return values


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _encode_json_fields(values: dict[str, Any]) -> None:
    for name in ("output", "routing"):
        if name in values and (name == "output" or values[name] is not None):
            values[name] = json.dumps(values[name])


class RunStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = store.lock

    @contextmanager
    def _tx(self) -> Iterator[_Tx]:
        """One transaction, committed on exit, rolled back on error. Plain SQL only:
        sqlite-utils' table methods commit on their own and would split it."""
        with self._lock, self.store.db.conn as conn:
            yield _Tx(conn)

    # -- runs -------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        dag_path: str,
        spec: dict[str, Any],
        inputs: dict[str, Any],
        nodes: Sequence[tuple[str, str, str]],
        *,
        parent: tuple[str, str] | None = None,
        agent: str | None = None,
    ) -> RunRecord:
        """The run and one pending record per node (id, path, type), in one transaction.
        ``parent`` (run id, node id): a subgraph call's run, linked both ways."""
        now = utc_now()
        with self._tx() as db:
            db.insert(
                "runs",
                {
                    "id": run_id,
                    "dag_path": dag_path,
                    "spec": json.dumps(spec),
                    "inputs": json.dumps(inputs),
                    "status": RunStatus.PENDING,
                    "tokens_used": 0,
                    "nodes_executed": 0,
                    "created_at": now,
                    "updated_at": now,
                    "parent_run_id": parent[0] if parent else None,
                    "parent_node_id": parent[1] if parent else None,
                    "agent": agent,
                },
            )
            if parent is not None:
                db.update(
                    "nodes", {"run_id": parent[0], "node_id": parent[1]}, {"child_run_id": run_id}
                )
            for node_id, path, kind in nodes:
                db.insert(
                    "nodes",
                    {
                        "run_id": run_id,
                        "node_id": node_id,
                        "path": path,
                        "type": kind,
                        "status": NodeStatus.PENDING,
                        "cache_hit": 0,
                        "resumed_from_checkpoint": 0,
                    },
                )
        return self.get_run(run_id)

    def import_run(
        self, run: dict[str, Any], nodes: list[dict[str, Any]], *, origin: str
    ) -> tuple[RunRecord, bool]:
        """A run moved here from the peer ``origin``: its record and every node's, in one
        transaction. It arrives ``interrupted`` (resuming continues it); unfinished nodes
        likewise. Returns the record and whether it is new: the same run from the same
        origin again (its answer was lost and it asks again) changes nothing and gets the
        record as it stands; any other run under that id raises ``RunExists``."""
        with self._tx() as db:
            row = db.execute(
                "select status, origin, spec, inputs from runs where id = ?", [run["id"]]
            ).fetchone()
            # a record that stayed here as "migrated" is history: the run comes back
            fresh = row is None or row[0] == RunStatus.MIGRATED
            if not fresh:
                _check_repeat(run, origin, *row)
            else:
                db.execute("delete from nodes where run_id = ?", [run["id"]])
                db.execute("delete from runs where id = ?", [run["id"]])
                _insert_import(db, run, nodes, origin)
        return self.get_run(run["id"]), fresh

    def get_run(self, run_id: str) -> RunRecord:
        with self._lock:
            rows = list(self.store.db.query("select * from runs where id = ?", [run_id]))
        if not rows:
            raise RunNotFound(f"no run {run_id!r}")
        return RunRecord.from_row(rows[0])

    def ids_starting_with(self, prefix: str, limit: int = 5) -> list[str]:
        """The ids of the runs whose id starts with ``prefix`` (newest first, at most
        ``limit``): what a short id given on the command line may name."""
        sql = "select id from runs where substr(id, 1, ?) = ? order by created_at desc limit ?"
        with self._lock:
            rows = self.store.db.query(sql, [len(prefix), prefix, limit])
            return [str(row["id"]) for row in rows]

    def run_with_nodes(self, run_id: str) -> tuple[RunRecord, list[NodeRecord]]:
        """The run's record and its nodes', as one moment left them (under one lock)."""
        with self._lock:
            return self.get_run(run_id), self.nodes(run_id)

    def list_runs(
        self, status: str | None = None, limit: int = 100, *, children: bool = False
    ) -> list[RunRecord]:
        """Runs, newest first; subgraph calls' child runs only with ``children``."""
        where: list[str] = [] if children else ["parent_run_id is null"]
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = "select * from runs" + (" where " + " and ".join(where) if where else "")
        with self._lock:
            rows = list(
                self.store.db.query(sql + " order by created_at desc limit ?", [*params, limit])
            )
        return [RunRecord.from_row(r) for r in rows]

    def set_status(
        self, run_id: str, status: RunStatus, *, error: str | None = None, **extra: Any
    ) -> None:
        """The run's status; a run that stops (finished, cancelled, interrupted, waiting on
        a person) leaves no node ``running``: one stopped mid-way is ``interrupted`` (its
        checkpoint resumes it), in the same transaction."""
        now = utc_now()
        values = {"status": status, "updated_at": now, "error": error, **extra}
        if status in FINISHED_RUN_STATES:
            values["finished_at"] = now
        with self._tx() as db:
            db.update("runs", {"id": run_id}, values)
            if status not in (RunStatus.RUNNING, RunStatus.PENDING, RunStatus.MIGRATING):
                db.execute(
                    "update nodes set status = ? where run_id = ? and status = ?",
                    [NodeStatus.INTERRUPTED, run_id, NodeStatus.RUNNING],
                )

    def mark_for_peer(self, run_id: str, peer: str) -> None:
        """The run is a subgraph ``peer`` sent and waits on (see ``RunRecord.for_peer``)."""
        with self._tx() as db:
            db.update("runs", {"id": run_id}, {"for_peer": peer, "updated_at": utc_now()})

    def mark_interrupted(self) -> list[str]:
        """Runs left ``running`` by a daemon that died: now ``interrupted`` (resumable).
        A subgraph a peer was waiting on is ``cancelled`` instead: that peer's call ended
        with the daemon and it has run the work elsewhere, so no one would read it."""
        with self._tx() as db:
            # "migrating": the daemon died mid-move; the peer may not have it
            rows = db.execute(
                "select id, for_peer from runs where status in (?, ?)",
                [RunStatus.RUNNING, RunStatus.MIGRATING],
            ).fetchall()
            ids = []
            for run_id, for_peer in rows:
                values: dict[str, Any] = {"status": RunStatus.INTERRUPTED, "updated_at": utc_now()}
                if for_peer is None:
                    ids.append(run_id)
                else:
                    values["status"] = RunStatus.CANCELLED
                    values["error"] = f"this daemon stopped while peer {for_peer} waited on it"
                db.update("runs", {"id": run_id}, values)
                db.execute(
                    "update nodes set status = ? where run_id = ? and status = ?",
                    [NodeStatus.INTERRUPTED, run_id, NodeStatus.RUNNING],
                )
        return ids

    # -- nodes ------------------------------------------------------------------------

    def nodes(self, run_id: str) -> list[NodeRecord]:
        with self._lock:
            rows = self.store.db.query(
                "select * from nodes where run_id = ? order by rowid", [run_id]
            )
            return [NodeRecord.from_row(r) for r in rows]

    def node(self, run_id: str, node_id: str) -> NodeRecord:
        with self._lock:
            rows = list(
                self.store.db.query(
                    "select * from nodes where run_id = ? and node_id = ?", [run_id, node_id]
                )
            )
        if not rows:
            raise RunNotFound(f"no node {node_id!r} in run {run_id!r}")
        return NodeRecord.from_row(rows[0])

    def update_node(self, run_id: str, node_id: str, update: NodeUpdate) -> None:
        """What just happened to the node, in one transaction."""
        with self._tx() as db:
            db.update("nodes", {"run_id": run_id, "node_id": node_id}, update.columns())

    def finish_node(self, run_id: str, node_id: str, finished: NodeFinished) -> RunCounters:
        """The node's final record and the run's counters, together; returns the run's
        counters as this transaction left them."""
        with self._tx() as db:
            db.update("nodes", {"run_id": run_id, "node_id": node_id}, finished.columns())
            db.execute(
                "update runs set tokens_used = tokens_used + ?,"
                " nodes_executed = nodes_executed + ?, updated_at = ? where id = ?",
                [finished.spent_tokens, finished.executions, utc_now(), run_id],
            )
            return _counters(db, run_id)

    def counters(self, run_id: str) -> RunCounters:
        """What the run has spent so far (``finish_node`` keeps the count)."""
        with self._tx() as db:
            return _counters(db, run_id)

    def counters_and_unfinished(
        self, run_id: str, node_ids: Collection[str]
    ) -> tuple[RunCounters, int]:
        """The run's counters and how many of ``node_ids`` (nodes running) they do not
        count yet, in one transaction: a node finishing meanwhile is in one or the other,
        never in both. (Its ``finish_node`` counts it; the task that ran it may still be
        writing its usage row or its cache entry.)"""
        with self._tx() as db:
            totals = _counters(db, run_id)
            unfinished = 0
            for node_id in node_ids:
                row = db.execute(
                    "select status from nodes where run_id = ? and node_id = ?", [run_id, node_id]
                ).fetchone()
                unfinished += row is None or row[0] != NodeStatus.SUCCEEDED
            return totals, unfinished

    def patch_node(self, run_id: str, node_id: str, **values: Any) -> None:
        """Any of the node's fields, as given (checked at run time): for tests that stage
        a record and for repairs. What happens to a node in a run is ``update_node``'s."""
        unknown = set(values) - _NODE_FIELDS
        if unknown:
            raise ValueError(f"unknown node fields: {sorted(unknown)}")
        _encode_json_fields(values)
        with self._tx() as db:
            db.update("nodes", {"run_id": run_id, "node_id": node_id}, values)

    # -- subgraph cache -----------------------------------------------------------------

    def cache_get(self, key: str) -> Any | None:
        with self._tx() as db:
            row = db.execute("select output from subgraph_cache where key = ?", [key]).fetchone()
            if row is None:
                return None
            db.execute("update subgraph_cache set last_used_at = ? where key = ?", [utc_now(), key])
        return json.loads(row[0])

    def cache_put(self, key: str, path: str, output: Any, tokens: int, max_entries: int) -> None:
        text = json.dumps(output)
        now = utc_now()
        with self._tx() as db:
            db.execute(
                "insert into subgraph_cache (key, path, output, tokens, size, created_at,"
                " last_used_at) values (?, ?, ?, ?, ?, ?, ?) on conflict (key) do update set"
                " output = excluded.output, last_used_at = excluded.last_used_at",
                [key, path, text, tokens, len(text), now, now],
            )
            db.execute(
                "delete from subgraph_cache where key in (select key from subgraph_cache"
                " order by last_used_at desc, rowid desc limit -1 offset ?)",
                [max_entries],
            )


def _counters(db: _Tx, run_id: str) -> RunCounters:
    sql = "select tokens_used, nodes_executed from runs where id = ?"
    row = db.execute(sql, [run_id]).fetchone()
    if row is None:
        raise RunNotFound(f"no run {run_id!r}")
    return RunCounters(tokens_used=row[0] or 0, nodes_executed=row[1] or 0)


def _check_repeat(
    run: dict[str, Any], origin: str, status: str, had_origin: str | None, spec: str, inputs: str
) -> None:
    """Whether an import of a run id already here repeats the one that made it (else
    ``RunExists``, saying what differs)."""
    here = f"run {run['id']} already exists here ({status}"
    if had_origin is None:
        raise RunExists(f"{here}, started on this node): a run moved here needs an unused id")
    if had_origin != origin:
        raise RunExists(f"{here}, moved from {had_origin}, not {origin})")
    if json.loads(spec) != run["spec"] or json.loads(inputs) != run["inputs"]:
        raise RunExists(
            f"{here}, moved from {origin}) with another DAG or inputs: one id cannot name two runs"
        )


def _insert_import(db: _Tx, run: dict[str, Any], nodes: list[dict[str, Any]], origin: str) -> None:
    now = utc_now()
    db.insert(
        "runs",
        {
            "id": run["id"],
            "dag_path": run["dag_path"],
            "spec": json.dumps(run["spec"]),
            "inputs": json.dumps(run["inputs"]),
            "status": RunStatus.INTERRUPTED,
            "tokens_used": int(run.get("tokens_used") or 0),
            "nodes_executed": int(run.get("nodes_executed") or 0),
            "created_at": run.get("created_at") or now,
            "updated_at": now,
            "error": "moved here from a peer; resuming continues it",
            "origin": origin,
            "agent": run["agent"] if isinstance(run.get("agent"), str) else None,
        },
    )
    for node in nodes:
        values = {k: v for k, v in node.items() if k in _NODE_FIELDS}
        if values.get("status") == NodeStatus.RUNNING:
            values["status"] = NodeStatus.INTERRUPTED
        _encode_json_fields(values)
        db.insert("nodes", {**values, "run_id": run["id"]})


class _Tx:
    """Plain-SQL helpers on one connection inside ``RunStore._tx``."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(sql, params)

    def insert(self, table: str, values: dict[str, Any]) -> None:
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.conn.execute(f"insert into {table} ({names}) values ({marks})", list(values.values()))

    def update(self, table: str, key: dict[str, Any], values: dict[str, Any]) -> None:
        sets = ", ".join(f"{name} = ?" for name in values)
        where = " and ".join(f"{name} = ?" for name in key)
        cursor = self.conn.execute(
            f"update {table} set {sets} where {where}", [*values.values(), *key.values()]
        )
        if cursor.rowcount == 0:
            raise RunNotFound(f"no {table} row {key}")
