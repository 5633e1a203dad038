"""Usage records: one row per request or DAG generation, and what ``pcrt usage`` prints."""

from __future__ import annotations

import collections
import logging
import sqlite3
import statistics
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlite_utils

from pcrt.cache.store import Store, utc_now

__all__ = ["UsageLog", "UsageRecord"]

log = logging.getLogger(__name__)


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
    written on every request and must not wait for an fsync (in WAL mode the database
    stays consistent; a power cut may lose the last rows). Run and node records keep the
    store's full durability.

    The daemon records with ``record_soon``, from its event loop: the row is queued and a
    writer thread of the log's own inserts it, in the order given. An insert can wait on
    another connection's write (a run's commit, a WAL checkpoint) for as long as that
    takes, and a request's accounting is sync code that cannot await a worker thread;
    queued, it takes microseconds. Reads (``rows``, ``summary``, ``served_speeds``) wait
    for the rows queued before them, so whoever reads sees what was recorded; ``close``
    writes what is queued, then closes. ``record`` writes in the caller's thread.
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
        # rows queued for the writer thread, and how many were ever queued and written
        # (or their failure logged): ``flush`` waits for the count it saw, not for an
        # empty queue, which a busy daemon may never have
        self._pending: collections.deque[UsageRecord] = collections.deque()
        self._queued = self._written = 0
        self._writer: threading.Thread | None = None  # started by the first record_soon
        self._closed = False
        self._state = threading.Condition()  # over all of the above

    def close(self) -> None:
        """Write the queued rows, stop the writer, close the connection."""
        with self._state:
            self._closed = True
            writer = self._writer
            self._state.notify_all()
        if writer is not None:
            writer.join()
        if self._own:
            with self._lock:
                self._conn.close()

    def record(self, record: UsageRecord) -> None:
        """Write the row now, in this thread."""
        self._insert([record])

    def record_soon(self, record: UsageRecord) -> None:
        """Queue the row for the writer thread and return at once (the event loop's way)."""
        with self._state:
            if self._closed:
                log.warning(
                    "usage log closed: a row of %s for %s not written", record.route, record.agent
                )
                return
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_queued, name="pcrt-usage-writer", daemon=True
                )
                self._writer.start()
            self._pending.append(record)
            self._queued += 1
            self._state.notify_all()

    def flush(self) -> None:
        """Return once every row queued so far is written (or its failure logged)."""
        with self._state:
            target = self._queued
            self._state.wait_for(lambda: self._written >= target)

    def _write_queued(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: bool(self._pending) or self._closed)
                if not self._pending:
                    return  # closed, and everything written
                batch = list(self._pending)  # what queued up meanwhile: one transaction
                self._pending.clear()
            try:
                self._insert(batch)
            except Exception:  # accounting never fails what it accounts for; say so
                log.exception("%d usage rows could not be written", len(batch))
            with self._state:
                self._written += len(batch)
                self._state.notify_all()

    def _insert(self, records: list[UsageRecord]) -> None:
        rows = [asdict(r) for r in records]
        names = ", ".join(rows[0])
        marks = ", ".join("?" for _ in rows[0])
        with self._lock, self._conn:
            self._conn.executemany(
                f"insert into usage ({names}) values ({marks})", [list(r.values()) for r in rows]
            )

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
        self.flush()
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
        self.flush()
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
        self.flush()
        with self._lock:
            return list(self.db.query(sql, params))

    def over_time(
        self, *, since: str, bucket_seconds: int, agent: str | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """What the dashboard's usage chart draws, in one scan of the rows since
        ``since`` (an ISO time as the store writes them): requests and tokens per agent in
        buckets of ``bucket_seconds``, oldest first (``start``: each bucket's first second,
        Unix time), and the totals per agent and model that ``summary`` gives. One scan,
        not two: on 100,000 rows each is ~0.1 s of a worker thread, every refresh."""
        if bucket_seconds < 1:
            raise ValueError("a bucket is at least a second")
        where, params = self._where(agent, since)
        bucket = int(bucket_seconds)
        # ts is ISO 8601 with its offset, which SQLite's strftime reads
        sql = (
            f"select cast(strftime('%s', ts) as integer) / {bucket} * {bucket} as start,"
            " agent, model, count(*) as requests, sum(status >= 400) as errors,"
            " sum(ran_on != 'local') as on_peers, sum(fallbacks is not null) as fell_back,"
            " sum(prompt_tokens) as prompt_tokens, sum(cached_tokens) as cached_tokens,"
            " sum(completion_tokens) as completion_tokens, sum(ttft_ms) as ttft_sum,"
            " count(ttft_ms) as ttft_count, sum(total_ms) as total_ms,"
            " min(ts) as first, max(ts) as last"
            f" from usage{where} group by start, agent, model"
        )
        self.flush()
        with self._lock:
            groups = list(self.db.query(sql, params))
        return _series(groups), _totals(groups)

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


# what a chart's bucket adds up per agent, and what the totals add up per agent and model
_SERIES = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens")
_SUMMED = (*_SERIES, "on_peers", "fell_back", "ttft_sum", "ttft_count", "total_ms")


def _plus(a: Any, b: Any) -> Any:
    """SQL's sum over two parts: None (no value) unless either has one."""
    return b if a is None else a if b is None else a + b


def _series(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per bucket and agent (the models of an agent added): requests and tokens."""
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    for g in groups:
        row = merged.setdefault(
            (g["start"], g["agent"]),
            {"start": g["start"], "agent": g["agent"], **dict.fromkeys(_SERIES, 0)},
        )
        for name in _SERIES:
            row[name] += g[name] or 0
    return [merged[key] for key in sorted(merged)]


def _totals(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per agent and model over every bucket: ``UsageLog.summary``'s rows."""
    folded: dict[tuple[str, str], dict[str, Any]] = {}
    for g in groups:
        key = (g["agent"], g["model"])
        row = folded.get(key)
        if row is None:
            folded[key] = dict(g)
            continue
        for name in _SUMMED:
            row[name] = _plus(row[name], g[name])
        row["first"] = min(row["first"], g["first"])
        row["last"] = max(row["last"], g["last"])
    totals = []
    for key in sorted(folded):
        row = folded[key]
        count = row.pop("ttft_count")
        ttft = row.pop("ttft_sum")
        row.pop("start")
        row["avg_ttft_ms"] = ttft / count if count else None
        totals.append(row)
    return totals
