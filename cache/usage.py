"""Usage records: one row per request or DAG generation, and what ``pcrt usage`` prints."""

from __future__ import annotations

import sqlite3
import statistics
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlite_utils

from pcrt.cache.store import Store, utc_now

__all__ = ["UsageLog", "UsageRecord"]


@dataclass(frozen=True)
class UsageRecord:
    agent: str
    model: str
    route: str
    status: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    ran_on: str = "local"  # "local" or the peer's name
    request_id: str = ""
    ts: str = field(default_factory=utc_now)
    fallbacks: str | None = None  # JSON [{"node", "error"}]: peers that failed it first


class UsageLog:
    """Writes and summarises usage rows; safe to call from several threads.

    Rows go through a connection of their own with ``synchronous=normal``: a usage row is
    written on every request, on the event loop, and must not wait for an fsync (in WAL
    mode the database stays consistent; a power cut may lose the last rows). Run and node
    records keep the store's full durability.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._own = store.path != ":memory:"
        self._lock = threading.Lock() if self._own else store.lock
        if self._own:
            self._conn = sqlite3.connect(store.path, timeout=30.0, check_same_thread=False)
            self._conn.execute("pragma synchronous = normal")
        else:
            self._conn = store.db.conn
        self.db = sqlite_utils.Database(self._conn)

    def close(self) -> None:
        if self._own:
            with self._lock:
                self._conn.close()

    def record(self, record: UsageRecord) -> None:
        row = asdict(record)
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock, self._conn:
            self._conn.execute(f"insert into usage ({names}) values ({marks})", list(row.values()))

    def served_speeds(self, model: str, last: int = 20) -> tuple[float | None, float | None]:
        """Decode and prefill tokens/s of this node's recent answers with ``model`` (the
        medians of its last ``last`` local successes long enough to tell); None without.
        Measured under whatever load there was: what a peer would get now."""
        sql = (
            "select prompt_tokens - coalesce(cached_tokens, 0) as computed, completion_tokens,"
            " ttft_ms, total_ms from usage where model = ? and status = 200"
            " and ran_on = 'local' and ttft_ms > 0 and completion_tokens >= 16"
            " order by id desc limit ?"
        )
        with self._lock:
            rows = list(self.db.query(sql, [model, last]))
        decode = [
            (r["completion_tokens"] - 1) / ((r["total_ms"] - r["ttft_ms"]) / 1000)
            for r in rows
            if r["total_ms"] > r["ttft_ms"]
        ]
        prefill = [r["computed"] / (r["ttft_ms"] / 1000) for r in rows if r["computed"] >= 32]
        return (
            statistics.median(decode) if decode else None,
            statistics.median(prefill) if prefill else None,
        )

    def rows(
        self, *, agent: str | None = None, since: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        where, params = self._where(agent, since)
        sql = f"select * from usage{where} order by id"
        if limit:
            sql += f" limit {int(limit)}"
        with self._lock:
            return list(self.db.query(sql, params))

    def summary(
        self, *, agent: str | None = None, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Totals per agent and model."""
        where, params = self._where(agent, since)
        sql = (
            "select agent, model, count(*) as requests,"
            " sum(status >= 400) as errors, sum(ran_on != 'local') as on_peers,"
            " sum(fallbacks is not null) as fell_back,"
            " sum(prompt_tokens) as prompt_tokens, sum(cached_tokens) as cached_tokens,"
            " sum(completion_tokens) as completion_tokens,"
            " avg(ttft_ms) as avg_ttft_ms, sum(total_ms) as total_ms,"
            " min(ts) as first, max(ts) as last"
            f" from usage{where} group by agent, model order by agent, model"
        )
        with self._lock:
            return list(self.db.query(sql, params))

    @staticmethod
    def _where(agent: str | None, since: str | None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if agent is not None:
            clauses.append("agent = ?")
            params.append(agent)
        if since is not None:
            clauses.append("ts >= ?")
            params.append(since)
        return (" where " + " and ".join(clauses) if clauses else ""), params
