"""Numbered schema migrations for pcrt's SQLite store.

Each migration is a function registered with ``@migration``; they run in the order they are
defined and each one's name is recorded in ``_pcrt_migrations`` once applied, so a database
made by any earlier version is brought up to date when the store opens it. Never edit or
reorder a migration that has shipped: add a new one.

All pending migrations run in one ``BEGIN IMMEDIATE`` transaction: when two processes open
a fresh database at once, the second waits for the first and then finds nothing to do; a
migration that fails leaves the database as it was.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import sqlite_utils

__all__ = ["MIGRATIONS", "MIGRATIONS_TABLE", "Migration", "applied", "migrate", "migration"]

MIGRATIONS_TABLE = "_pcrt_migrations"

Migration = Callable[[sqlite_utils.Database], None]

MIGRATIONS: tuple[Migration, ...] = ()
"""Filled by ``@migration`` at import time (a tuple: nothing can change it afterwards)."""


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration."""
    global MIGRATIONS
    MIGRATIONS = (*MIGRATIONS, fn)
    return fn


def applied(db: sqlite_utils.Database) -> list[str]:
    """Names of the migrations this database has recorded, in the order applied."""
    if not db.table(MIGRATIONS_TABLE).exists():
        return []
    return [row["name"] for row in db.query(f"select name from {MIGRATIONS_TABLE} order by rowid")]


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration] | None = None) -> list[str]:
    """Apply every migration not yet recorded; return the names of those it ran.
    ``migrations``: the list to apply (default: pcrt's own, ``MIGRATIONS``)."""
    migrations = MIGRATIONS if migrations is None else migrations
    recorded = set(applied(db))
    if all(fn.__name__ in recorded for fn in migrations):
        return []  # the usual case: no write lock taken
    db.conn.execute("BEGIN IMMEDIATE")  # one migrator at a time; the others wait
    try:
        _ensure_migrations_table(db)
        done = set(applied(db))  # again, under the lock
        ran = []
        for fn in migrations:
            if fn.__name__ in done:
                continue
            fn(db)
            db.execute(
                f"insert into {MIGRATIONS_TABLE} (name, applied_at) values (?, ?)",
                [fn.__name__, datetime.datetime.now(datetime.UTC).isoformat()],
            )
            ran.append(fn.__name__)
        db.conn.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise
    return ran


def _ensure_migrations_table(db: sqlite_utils.Database) -> None:
    db.table(MIGRATIONS_TABLE).create(
        {"name": str, "applied_at": str}, pk="name", if_not_exists=True
    )


@migration
def m001_file_hashes(db: sqlite_utils.Database) -> None:
    # sha256 of files (model GGUFs, KV blobs) keyed by the stat that makes it still valid
    db.table("file_hashes").create(
        {
            "path": str,
            "size": int,
            "mtime_ns": int,
            "sha256": str,
            "computed_at": str,
        },
        pk="path",
        not_null={"size", "mtime_ns", "sha256"},
    )


@migration
def m002_bench_results(db: sqlite_utils.Database) -> None:
    # prefill and decode speed of a model on a machine, keyed by what makes them comparable:
    # the model file, the device fingerprint, the offload plan and the thread count
    db.table("bench_results").create(
        {
            "id": int,
            "model_sha256": str,
            "model": str,
            "fingerprint": str,
            "plan_key": str,
            "n_threads": int,
            "plan_json": str,
            "prompt_tokens": int,
            "prefill_seconds": float,
            "prefill_tps": float,
            "decode_tokens": int,
            "decode_seconds": float,
            "decode_tps": float,
            "llama_cpp_version": str,
            "measured_at": str,
        },
        pk="id",
        not_null={"model_sha256", "fingerprint", "plan_key", "measured_at"},
    )
    db.table("bench_results").create_index(["model_sha256", "fingerprint", "plan_key"])


@migration
def m003_usage(db: sqlite_utils.Database) -> None:
    # one row per API request: who asked, what ran where, and what it cost
    db.table("usage").create(
        {
            "id": int,
            "ts": str,
            "agent": str,
            "model": str,
            "route": str,
            "status": int,
            "prompt_tokens": int,
            "cached_tokens": int,
            "completion_tokens": int,
            "ttft_ms": float,
            "total_ms": float,
            "ran_on": str,
            "request_id": str,
        },
        pk="id",
        not_null={"ts", "agent", "model", "route", "status"},
    )
    db.table("usage").create_index(["agent", "ts"])
    db.table("usage").create_index(["ts"])


@migration
def m004_runs_nodes_blobs(db: sqlite_utils.Database) -> None:
    # DAG runs and their nodes (issue 5); KV state blobs and the subgraph result cache
    db.table("runs").create(
        {
            "id": str,
            "dag_path": str,
            "spec": str,  # the DAG document, JSON
            "inputs": str,  # JSON
            "status": str,  # pending running interrupted succeeded failed budget_exceeded
            #                 cancelled migrated
            "error": str,
            "tokens_used": int,
            "nodes_executed": int,
            "created_at": str,
            "updated_at": str,
            "finished_at": str,
            "migrated_to": str,
        },
        pk="id",
        not_null={"dag_path", "spec", "inputs", "status", "created_at", "updated_at"},
    )
    db.table("runs").create_index(["status"])
    db.table("nodes").create(
        {
            "run_id": str,
            "node_id": str,
            "path": str,
            "type": str,
            "status": str,  # pending running succeeded failed skipped
            "output": str,  # JSON
            "prompt_tokens": int,
            "cached_tokens": int,
            "completion_tokens": int,
            "started_at": str,
            "finished_at": str,
            "seconds": float,
            "ran_on": str,
            "model": str,
            "state_sha256": str,  # the finished node's KV (prompt + output)
            "checkpoint_sha256": str,  # the latest mid-generation checkpoint
            "checkpoint_tokens": int,
            "cache_hit": int,
            "resumed_from_checkpoint": int,
            "error": str,
        },
        pk=("run_id", "node_id"),
        not_null={"run_id", "node_id", "path", "type", "status"},
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("blobs").create(
        {
            "sha256": str,
            "size": int,
            "kind": str,
            "run_id": str,
            "created_at": str,
            "last_used_at": str,
        },
        pk="sha256",
        not_null={"size", "kind", "created_at", "last_used_at"},
    )
    db.table("blobs").create_index(["run_id"])
    db.table("blobs").create_index(["last_used_at"])
    db.table("subgraph_cache").create(
        {
            "key": str,
            "path": str,
            "output": str,  # JSON
            "tokens": int,
            "size": int,
            "created_at": str,
            "last_used_at": str,
        },
        pk="key",
        not_null={"path", "output", "created_at", "last_used_at"},
    )
    db.table("subgraph_cache").create_index(["last_used_at"])


@migration
def m005_node_routing(db: sqlite_utils.Database) -> None:
    """Where each node was sent and why, with every failed attempt before it (issue 6)."""
    db.table("nodes").add_column("routing", str)  # JSON: {"reason", "attempts": [...]}


@migration
def m006_subgraph_runs(db: sqlite_utils.Database) -> None:
    """A subgraph call runs as a child run, linked both ways to the node that called it."""
    db.table("runs").add_column("parent_run_id", str)
    db.table("runs").add_column("parent_node_id", str)
    db.table("runs").create_index(["parent_run_id"])
    db.table("nodes").add_column("child_run_id", str)


@migration
def m007_usage_fallbacks(db: sqlite_utils.Database) -> None:
    """The peers a request tried and lost before the one that served it (issue 6)."""
    db.table("usage").add_column("fallbacks", str)  # JSON: [{"node", "error"}, ...]


@migration
def m008_run_origin(db: sqlite_utils.Database) -> None:
    """The peer a migrated run came from: a repeat of the same import is recognised."""
    db.table("runs").add_column("origin", str)


@migration
def m009_runs_for_peer(db: sqlite_utils.Database) -> None:
    """A run a peer sent as a subgraph and waits on: the node waiting. Such a run is never
    moved, and a restart does not resume it (its caller has moved on)."""
    db.table("runs").add_column("for_peer", str)


@migration
def m010_run_agent(db: sqlite_utils.Database) -> None:
    """The agent a run works for (the X-PC-Agent-ID of the request that started it):
    each generation it makes is a usage row billed to that agent."""
    db.table("runs").add_column("agent", str)


@migration
def m011_tool_calls(db: sqlite_utils.Database) -> None:
    """Each tool call of a DAG's tool and agent nodes (issue 18), recorded before it is
    sent and its result before the model reads it: a resume never sends it again."""
    db.execute(
        """
        create table tool_calls (
            run_id text not null,
            node_id text not null,
            step integer not null,       -- an agent's generate-call round (0 for a tool node)
            seq integer not null,        -- the call's place among its step's calls
            call_id text not null,       -- what the model's conversation names it by
            tool text not null,
            arguments text not null,     -- JSON
            status text not null,        -- CallStatus
            attempts integer not null default 1,
            decision text,               -- after a crash: "retry" or "skip" (a person's)
            ok integer,
            result text,                 -- JSON: {"text", "value", "error"}
            result_bytes integer,
            sent_at text not null,
            finished_at text,
            seconds real,
            primary key (run_id, node_id, step, seq)
        )
        """
    )


@migration
def m012_kv_chunks(db: sqlite_utils.Database) -> None:
    """The disk tier of the KV chunk store (issue 19): each chunk's file by its chain key,
    its content hash (checked on every read), and the chunks unfinished runs pin. A tail
    (fewer tokens than a chunk: a sequence's end) also names the chunk it follows and
    its tokens, which a prompt is matched against."""
    db.execute(
        """
        create table kv_chunks (
            key text primary key,        -- the chain key (hex sha256)
            sha256 text not null,        -- of the file's bytes
            size integer not null,
            n_tokens integer not null,
            created_at text not null,
            last_used_at text not null,
            parent text,                 -- a tail's: the key of the chain it ends
            tokens blob                  -- a tail's: its token ids, int32 little-endian
        )
        """
    )
    db.execute("create index kv_chunks_lru on kv_chunks (last_used_at)")
    db.execute(
        """
        create table kv_chunk_pins (
            owner text not null,         -- a run id, or another holder's name
            key text not null,
            primary key (owner, key)
        )
        """
    )


@migration
def m013_responses(db: sqlite_utils.Database) -> None:
    """Responses stored for ``previous_response_id`` and ``GET /v1/responses/{id}`` (issue
    20): each one's conversation (the input items its model read, the instructions aside,
    which OpenAI does not carry over) and the Response object as it was answered. ``seq``
    orders them for the bound on how many are kept (``cache/responses.py``)."""
    db.execute(
        """
        create table responses (
            seq integer primary key autoincrement,  -- never reused: oldest first
            id text not null unique,
            agent text not null,
            model text not null,
            created_at text not null,
            conversation text not null,  -- JSON: the input items, in order
            response text not null       -- JSON: the Response object
        )
        """
    )
