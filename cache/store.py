"""pcrt's SQLite store: one database file, migrated to the current schema when opened.

The store is an object built by whoever owns the process (the CLI command, the daemon's
lifespan) and passed in; nothing here is global. It imports nothing else of pcrt, so every
other package may use it.
"""

from __future__ import annotations

import datetime
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType

import sqlite_utils

from pcrt.cache.migrations import Migration, migrate

__all__ = ["BenchRecord", "FileHash", "Store", "utc_now"]


def utc_now() -> str:
    """The store's timestamps: ISO 8601 in UTC, always to the microsecond, so that they
    sort as strings and LRU order does not tie within a millisecond."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class FileHash:
    """A file's sha256 together with the stat it was computed for."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    computed_at: str


@dataclass(frozen=True)
class BenchRecord:
    """One benchmark of a model on a machine (``pcrt bench``); ``id`` is None until stored."""

    model_sha256: str
    model: str
    fingerprint: str
    plan_key: str
    n_threads: int
    plan_json: str
    prompt_tokens: int
    prefill_seconds: float
    prefill_tps: float
    decode_tokens: int
    decode_seconds: float
    decode_tps: float
    llama_cpp_version: str
    measured_at: str
    id: int | None = None


class Store:
    """The SQLite database at ``db_path`` (or ``":memory:"``), migrated on open (by
    ``migrations``: pcrt's own unless a test brings its list)."""

    def __init__(
        self, db_path: Path | str, *, migrations: Sequence[Migration] | None = None
    ) -> None:
        if str(db_path) != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(db_path)
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        # one connection, used from the event loop and from worker threads (blob reads
        # and writes): whoever uses ``db`` holds this lock, or one thread's statements
        # land inside (or commit) another's transaction
        self.lock = threading.RLock()
        if str(db_path) != ":memory:":
            # readers do not block the writer: the daemon and a CLI command share the file
            self.db.enable_wal()
        migrate(self.db, migrations)

    def close(self) -> None:
        # under the lock: closing the connection while a worker thread runs a statement
        # on it crashes the process; after this, a late statement is a clean error
        with self.lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- file hashes ------------------------------------------------------------------

    def get_file_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The cached sha256 of ``path`` if it was computed for exactly this size and mtime."""
        with self.lock:
            rows = list(
                self.db.query(
                    "select sha256 from file_hashes where path = ? and size = ? and mtime_ns = ?",
                    [path, size, mtime_ns],
                )
            )
            return rows[0]["sha256"] if rows else None

    def put_file_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        """Record (or replace) the sha256 of ``path`` for this size and mtime."""
        with self.lock:
            # one statement, so a concurrent writer makes it wait (busy timeout), never fail
            self.db.execute(
                "insert into file_hashes (path, size, mtime_ns, sha256, computed_at)"
                " values (?, ?, ?, ?, ?) on conflict (path) do update set size = excluded.size,"
                " mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256,"
                " computed_at = excluded.computed_at",
                [path, size, mtime_ns, sha256, datetime.datetime.now(datetime.UTC).isoformat()],
            )

    def forget_file_hash(self, path: str) -> None:
        with self.lock:
            self.db.execute("delete from file_hashes where path = ?", [path])

    def file_hashes(self) -> list[FileHash]:
        with self.lock:
            return [FileHash(**row) for row in self.db.query("select * from file_hashes")]

    # -- benchmark results ------------------------------------------------------------

    def add_bench_result(self, record: BenchRecord) -> BenchRecord:
        """Store a benchmark; returns it with its id."""
        with self.lock:
            fields = {k: v for k, v in asdict(record).items() if k != "id"}
            # one statement; the cursor's lastrowid is this insert's even with other writers
            cursor = self.db.execute(
                f"insert into bench_results ({', '.join(fields)})"
                f" values ({', '.join('?' for _ in fields)})",
                list(fields.values()),
            )
            return replace(record, id=cursor.lastrowid)

    def bench_results(self, model_sha256: str | None = None, limit: int = 50) -> list[BenchRecord]:
        """Benchmarks, newest first (of one model file when ``model_sha256`` is given)."""
        with self.lock:
            where, params = ("where model_sha256 = ?", [model_sha256]) if model_sha256 else ("", [])
            rows = self.db.query(
                f"select * from bench_results {where} order by measured_at desc, id desc limit ?",
                [*params, limit],
            )
            return [BenchRecord(**row) for row in rows]

    def latest_bench(
        self, model_sha256: str, fingerprint: str, plan_key: str, n_threads: int
    ) -> BenchRecord | None:
        """The newest benchmark that still applies: same file, machine, plan and threads.

        A changed fingerprint (other hardware, another llama.cpp build) finds nothing, so
        callers re-measure instead of trusting figures from another machine.
        """
        with self.lock:
            rows = list(
                self.db.query(
                    "select * from bench_results where model_sha256 = ? and fingerprint = ?"
                    " and plan_key = ? and n_threads = ?"
                    " order by measured_at desc, id desc limit 1",
                    [model_sha256, fingerprint, plan_key, n_threads],
                )
            )
            return BenchRecord(**rows[0]) if rows else None
