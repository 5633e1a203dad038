"""DAG runs and node records, written so that a crash at any instant leaves them consistent.

Every change is one SQLite transaction, and blobs are stored (fsynced, renamed) before a
record names them. A run the daemon was executing when it died still says ``running``;
``mark_interrupted`` turns those into ``interrupted`` at start-up, and a resume picks up
each node from its record: finished nodes keep their outputs, an interrupted node its
last checkpoint.

A subgraph call runs as a child run: its record names the calling run and node
(``parent_run_id``, ``parent_node_id``) and the calling node's record names the child
(``child_run_id``), both written in the transaction that creates the child. Listings show
top-level runs unless asked for children: a child is resumed through its parent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from pcrt.cache.status import FINISHED_RUN_STATES, NodeStatus, RunStatus
from pcrt.cache.store import Store, utc_now

__all__ = ["NodeRecord", "RunExists", "RunNotFound", "RunRecord", "RunStore"]


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
        nodes: list[tuple[str, str, str]],
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

    def list_runs(
        self, status: RunStatus | None = None, limit: int = 100, *, children: bool = False
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
        now = utc_now()
        values = {"status": status, "updated_at": now, "error": error, **extra}
        if status in FINISHED_RUN_STATES:
            values["finished_at"] = now
        with self._tx() as db:
            db.update("runs", {"id": run_id}, values)

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

    def update_node(self, run_id: str, node_id: str, **values: Any) -> None:
        unknown = set(values) - _NODE_FIELDS
        if unknown:
            raise ValueError(f"unknown node fields: {sorted(unknown)}")
        _encode_json_fields(values)
        with self._tx() as db:
            db.update("nodes", {"run_id": run_id, "node_id": node_id}, values)

    def finish_node(
        self, run_id: str, node_id: str, *, tokens: int, executed: int = 1, **values: Any
    ) -> None:
        """The node's final record and the run's counters, together. ``executed``: the
        node executions it counts for (a subgraph call: its child run's)."""
        _encode_json_fields(values)
        values.setdefault("finished_at", utc_now())
        with self._tx() as db:
            db.update("nodes", {"run_id": run_id, "node_id": node_id}, values)
            db.execute(
                "update runs set tokens_used = tokens_used + ?,"
                " nodes_executed = nodes_executed + ?, updated_at = ? where id = ?",
                [tokens, executed, utc_now(), run_id],
            )

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
            "status": "interrupted",
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
