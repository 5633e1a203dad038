"""Responses of OpenAI's Responses API kept for later (``store: true``): what
``previous_response_id`` continues and ``GET /v1/responses/{id}`` answers.

A stored response is self-contained: its ``conversation`` is every input item its model
read (those of the responses it continued included), so continuing it is one read, and
dropping an old response never breaks a newer one that continued it.

The table is bounded by count: each ``put`` keeps the newest ``kept`` responses and drops
the rest in the same transaction. Each row is bounded too: its conversation had to fit
the model's context for the response to exist, and a request body is bounded by its
route (``bodies.py``). So the table holds at most ``kept`` contexts' worth of text.

Every method blocks: code on the event loop awaits them through ``AsyncResponses``
(``async_runs.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pcrt.cache.store import Store, utc_now

__all__ = ["DEFAULT_KEPT", "ResponseStore", "StoredResponse"]

DEFAULT_KEPT = 1000  # responses kept; the oldest go first


@dataclass(frozen=True)
class StoredResponse:
    id: str
    agent: str
    model: str
    conversation: list[dict[str, Any]]  # input items, in order, without the instructions
    response: dict[str, Any]  # the Response object as the API answered it

    def continued(self) -> list[dict[str, Any]]:
        """The conversation a response that continues this one starts from: its input
        items, then its output items (which are input items too)."""
        return [*self.conversation, *self.response.get("output", [])]


class ResponseStore:
    def __init__(self, store: Store, kept: int = DEFAULT_KEPT) -> None:
        if kept < 1:
            raise ValueError("kept must be at least 1")
        self.store = store
        self.kept = kept

    def put(self, stored: StoredResponse) -> None:
        """Store (or replace) a response, and drop the oldest past the bound: one
        transaction."""
        with self.store.lock, self.store.db.conn as conn:
            conn.execute(
                "insert or replace into responses"
                " (id, agent, model, created_at, conversation, response)"
                " values (?, ?, ?, ?, ?, ?)",
                [
                    stored.id,
                    stored.agent,
                    stored.model,
                    utc_now(),
                    json.dumps(stored.conversation, ensure_ascii=False),
                    json.dumps(stored.response, ensure_ascii=False),
                ],
            )
            conn.execute(
                "delete from responses where seq <= (select seq from responses"
                " order by seq desc limit 1 offset ?)",
                [self.kept],
            )

    def get(self, response_id: str) -> StoredResponse | None:
        with self.store.lock:
            rows = list(
                self.store.db.query(
                    "select id, agent, model, conversation, response from responses where id = ?",
                    [response_id],
                )
            )
        if not rows:
            return None
        row = rows[0]
        return StoredResponse(
            id=row["id"],
            agent=row["agent"],
            model=row["model"],
            conversation=json.loads(row["conversation"]),
            response=json.loads(row["response"]),
        )

    def delete(self, response_id: str) -> bool:
        """Whether there was such a response."""
        with self.store.lock, self.store.db.conn as conn:
            cursor = conn.execute("delete from responses where id = ?", [response_id])
            return cursor.rowcount > 0

    def count(self) -> int:
        with self.store.lock:
            return int(self.store.db.execute("select count(*) from responses").fetchone()[0])
