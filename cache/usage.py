"""Usage records: one row per request, and the summaries ``pcrt usage`` prints."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

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
    ran_on: str = "local"  # "local" or the peer's name (routing, later)
    request_id: str = ""
    ts: str = field(default_factory=utc_now)


class UsageLog:
    """Writes and summarises usage rows; safe to call from several threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()  # one sqlite connection, shared by the loop's workers

    def record(self, record: UsageRecord) -> None:
        with self._lock:
            self.store.db["usage"].insert(asdict(record))

    def rows(
        self, *, agent: str | None = None, since: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        where, params = self._where(agent, since)
        sql = f"select * from usage{where} order by id"
        if limit:
            sql += f" limit {int(limit)}"
        with self._lock:
            return list(self.store.db.query(sql, params))

    def summary(
        self, *, agent: str | None = None, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Totals per agent and model."""
        where, params = self._where(agent, since)
        sql = (
            "select agent, model, count(*) as requests,"
            " sum(status >= 400) as errors,"
            " sum(prompt_tokens) as prompt_tokens, sum(cached_tokens) as cached_tokens,"
            " sum(completion_tokens) as completion_tokens,"
            " avg(ttft_ms) as avg_ttft_ms, sum(total_ms) as total_ms,"
            " min(ts) as first, max(ts) as last"
            f" from usage{where} group by agent, model order by agent, model"
        )
        with self._lock:
            return list(self.store.db.query(sql, params))

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
