"""The tool calls of DAG runs: each recorded before it is sent, its result before the
model (or the next node) reads it, so a resume never sends a call twice by accident.

A call is keyed by its place: the run, the node, the step (an agent's generate-call
round; 0 for a ``tool`` node) and its place among the step's calls. Replaying a node
finds each call at the same place: a ``done`` one gives its recorded result, a ``sent``
one was in flight when the daemon died. Whether that one may go again is the
executor's rule (its tool's ``idempotent``, or a person's ``decision``); this module
only keeps the records, each change one transaction. Every method blocks: the executor
awaits them through ``AsyncToolCalls`` (``async_runs.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pcrt.cache.status import CallStatus
from pcrt.cache.store import Store, utc_now

__all__ = ["CallBudgetSpent", "CallRecord", "NewCall", "ToolCallStore"]

Decision = Literal["retry", "skip"]


class CallBudgetSpent(Exception):
    """Recording these calls would pass the run's ``max_tool_calls``."""

    def __init__(self, made: int, asked: int, limit: int) -> None:
        super().__init__(f"{made} made, {asked} more asked, {limit} allowed")


@dataclass(frozen=True)
class NewCall:
    """A call about to be recorded at its place (``seq``) in a step."""

    seq: int
    call_id: str
    tool: str
    arguments: dict[str, Any]
    denied: bool = False


@dataclass(frozen=True)
class CallRecord:
    run_id: str
    node_id: str
    step: int
    seq: int
    call_id: str
    tool: str
    arguments: dict[str, Any]
    status: CallStatus
    attempts: int
    decision: Decision | None
    ok: bool | None
    result: dict[str, Any] | None  # {"text", "value", "error"}
    result_bytes: int | None
    sent_at: str
    finished_at: str | None
    seconds: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CallRecord:
        values = dict(row)
        values["arguments"] = json.loads(values["arguments"])
        values["result"] = json.loads(values["result"]) if values["result"] else None
        values["status"] = CallStatus(values["status"])
        values["ok"] = None if values["ok"] is None else bool(values["ok"])
        return cls(**values)

    def view(self) -> dict[str, Any]:
        """As ``pcrt dag status`` and the API show it: arguments, outcome, size, time."""
        return {
            "node": self.node_id,
            "step": self.step,
            "seq": self.seq,
            "call_id": self.call_id,
            "tool": self.tool,
            "arguments": self.arguments,
            "status": str(self.status),
            "ok": self.ok,
            "error": (self.result or {}).get("error"),
            "result_bytes": self.result_bytes,
            "seconds": self.seconds,
            "attempts": self.attempts,
        }


class ToolCallStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = store.lock

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock, self.store.db.conn as conn:
            yield conn

    def find(self, run_id: str, node_id: str, step: int, seq: int) -> CallRecord | None:
        where = "run_id = ? and node_id = ? and step = ? and seq = ?"
        found = self._select(where, (run_id, node_id, step, seq))
        return found[0] if found else None

    def of_node(self, run_id: str, node_id: str) -> list[CallRecord]:
        return self._select("run_id = ? and node_id = ?", (run_id, node_id))

    def of_run(self, run_id: str) -> list[CallRecord]:
        return self._select("run_id = ?", (run_id,))

    def of_tree(self, run_id: str) -> list[CallRecord]:
        """The calls of the run and of the subgraph calls' child runs under it."""
        return self._select(_TREE, (run_id,))

    def in_flight(self, run_id: str) -> list[CallRecord]:
        """Calls sent and never answered, of the run and of the subgraph calls' child
        runs under it: the ones a crash left for a person."""
        return self._select(f"{_TREE} and status = ?", (run_id, str(CallStatus.SENT)))

    def sent(
        self,
        run_id: str,
        node_id: str,
        step: int,
        seq: int,
        *,
        call_id: str,
        tool: str,
        arguments: dict[str, Any],
        denied: bool = False,
    ) -> CallRecord:
        """Record one call before it is sent (``sent_step`` with one call)."""
        call = NewCall(seq, call_id, tool, arguments, denied)
        (record,) = self.sent_step(run_id, node_id, step, [call])
        return record

    def sent_step(
        self,
        run_id: str,
        node_id: str,
        step: int,
        calls: Sequence[NewCall],
        limit: int | None = None,
    ) -> list[CallRecord]:
        """Record a step's calls before any is sent (or, ``denied``, instead of sending
        it), in one transaction: a crash leaves all of the step or none of it. A call
        already at its place is sent again: one more attempt. ``limit``: the run's
        calls at most (``CallBudgetSpent``, nothing recorded), counted in the same
        transaction, so steps recording at once cannot both take the last one."""
        now = utc_now()
        with self._tx() as db:
            if limit is not None:
                made = db.execute(
                    "select count(*) from tool_calls where run_id = ?", (run_id,)
                ).fetchone()[0]
                new = sum(
                    1
                    for call in calls
                    if db.execute(
                        "select 1 from tool_calls where run_id = ? and node_id = ? and "
                        "step = ? and seq = ?",
                        (run_id, node_id, step, call.seq),
                    ).fetchone()
                    is None
                )
                if made + new > limit:
                    raise CallBudgetSpent(made, new, limit)
            for call in calls:
                key = (run_id, node_id, step, call.seq)
                known = db.execute(
                    "select 1 from tool_calls where run_id = ? and node_id = ? and step = ? "
                    "and seq = ?",
                    key,
                ).fetchone()
                if known is None:
                    status = CallStatus.DENIED if call.denied else CallStatus.SENT
                    db.execute(
                        "insert into tool_calls (run_id, node_id, step, seq, call_id, tool, "
                        "arguments, status, sent_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            *key,
                            call.call_id,
                            call.tool,
                            json.dumps(call.arguments),
                            str(status),
                            now,
                        ),
                    )
                else:
                    db.execute(
                        "update tool_calls set attempts = attempts + 1, decision = null, "
                        "sent_at = ?, status = ? where run_id = ? and node_id = ? and "
                        "step = ? and seq = ?",
                        (now, str(CallStatus.SENT), *key),
                    )
        found = [self.find(run_id, node_id, step, call.seq) for call in calls]
        return [record for record in found if record is not None]

    def answered(
        self,
        run_id: str,
        node_id: str,
        step: int,
        seq: int,
        *,
        ok: bool,
        result: dict[str, Any],
        seconds: float | None,
        status: CallStatus = CallStatus.DONE,
    ) -> CallRecord:
        """Record a call's result (or, ``SKIPPED``, the result a person gave for it)."""
        text = json.dumps(result)
        with self._tx() as db:
            db.execute(
                "update tool_calls set status = ?, ok = ?, result = ?, result_bytes = ?, "
                "finished_at = ?, seconds = ?, decision = null where run_id = ? and "
                "node_id = ? and step = ? and seq = ?",
                (
                    str(status),
                    int(ok),
                    text,
                    len(text.encode()),
                    utc_now(),
                    seconds,
                    run_id,
                    node_id,
                    step,
                    seq,
                ),
            )
        found = self.find(run_id, node_id, step, seq)
        assert found is not None
        return found

    def imported(self, run_id: str, calls: Sequence[dict[str, Any]]) -> None:
        """The calls a peer made for nodes of this run it ran (its answer's views, with
        their results), recorded as they ended there: in one transaction."""
        now = utc_now()
        with self._tx() as db:
            for c in calls:
                result = c.get("result")
                text = json.dumps(result) if result is not None else None
                db.execute(
                    "insert or replace into tool_calls (run_id, node_id, step, seq, call_id, "
                    "tool, arguments, status, attempts, ok, result, result_bytes, sent_at, "
                    "finished_at, seconds) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        str(c["node"]),
                        int(c["step"]),
                        int(c.get("seq", 0)),
                        str(c["call_id"]),
                        str(c["tool"]),
                        json.dumps(c.get("arguments") or {}),
                        str(CallStatus(c.get("status", "done"))),
                        int(c.get("attempts") or 1),
                        None if c.get("ok") is None else int(bool(c["ok"])),
                        text,
                        c.get("result_bytes"),
                        now,
                        now,
                        c.get("seconds"),
                    ),
                )

    def decide(self, run_id: str, decision: Decision, result: Any = None) -> list[CallRecord]:
        """A person's word on the run's calls in flight: ``retry`` sends each again;
        ``skip`` records ``result`` as each one's answer, never sending it. Returns them."""
        calls = self.in_flight(run_id)
        for call in calls:
            key = (call.run_id, call.node_id, call.step, call.seq)
            if decision == "skip":
                given = {"text": _text(result), "value": result, "error": None}
                self.answered(*key, ok=True, result=given, seconds=None, status=CallStatus.SKIPPED)
            else:
                with self._tx() as db:
                    db.execute(
                        "update tool_calls set decision = ? where run_id = ? and node_id = ? "
                        "and step = ? and seq = ?",
                        ("retry", *key),
                    )
        found = (self.find(c.run_id, c.node_id, c.step, c.seq) for c in calls)
        return [c for c in found if c is not None]

    def _select(self, where: str, params: tuple[Any, ...]) -> list[CallRecord]:
        with self._tx() as db:
            cursor = db.execute(f"select * from tool_calls where {where} order by rowid", params)
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        return [CallRecord.from_row(dict(zip(names, row, strict=True))) for row in rows]


_TREE = (
    "run_id in (with recursive tree(id) as (select ? union all select r.id from runs r "
    "join tree on r.parent_run_id = tree.id) select id from tree)"
)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
