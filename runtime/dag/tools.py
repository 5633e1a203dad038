"""Tool calls of a DAG run, each sent at most once, and the ``tool`` node.

A call has a place (node, step, its place in the step) and a record there. The record is
written before the call is sent and its result before the model or the next node reads
it, so a resume replays a recorded call from its record: a ``done`` call gives its
result and is not sent again. A call recorded ``sent`` with no result was in flight when
the daemon died: it goes again only if its tool is ``idempotent`` or a person said
``retry`` (``pcrt dag resume RUN --retry-call``); otherwise the run stops as
``needs_attention`` (``NeedsAttention``) until a person decides, or gives its result
(``--skip-call RESULT_JSON``). No client-side agent loop can promise this: it cannot know
whether its last request reached the tool.

Refusals are recorded too, and never sent: an agent the config does not allow the tool
(``denied``), arguments that do not fit its schema, a tool that is not registered. A
refusal or a tool's failure is a result with ``ok`` false: an agent reads it; a ``tool``
node fails on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pcrt.cache.runs import NodeStarted
from pcrt.cache.status import CallStatus
from pcrt.cache.store import utc_now
from pcrt.cache.tool_calls import CallBudgetSpent, CallRecord, NewCall
from pcrt.runtime.dag.context import RunContext
from pcrt.runtime.dag.spec import ToolNode
from pcrt.runtime.dag.template_render import render_value_async
from pcrt.runtime.errors import BudgetExceeded, NeedsAttention, PcrtError
from pcrt.runtime.tools import ToolRegistry, ToolResult

__all__ = ["PlannedCall", "run_calls", "run_tool_node"]


@dataclass(frozen=True)
class PlannedCall:
    """A call at its place in a node: ``seq`` among its step's calls."""

    call_id: str
    tool: str
    arguments: dict[str, Any]


async def run_tool_node(run: RunContext, node: ToolNode, scope: dict[str, Any]) -> Any:
    """A ``tool`` node's output: its tool's result (JSON, or the text), called once."""
    arguments = {
        name: await render_value_async(run.deps.env, value, scope, node=node.id)
        for name, value in node.arguments.items()
    }
    started = NodeStarted(ran_on=run.deps.ran_on, started_at=utc_now())
    await run.deps.runs.update_node(run.id, node.id, started)  # running while it calls
    call = PlannedCall(f"{run.id}-{node.id}", node.tool, arguments)
    (result,) = await run_calls(run, node.id, 0, [call], timeout=node.timeout)
    if not result.ok:
        raise PcrtError(f"node {node.id}: tool {node.tool!r} failed: {result.error}")
    return result.value if result.value is not None else result.text


async def run_calls(
    run: RunContext,
    node_id: str,
    step: int,
    planned: Sequence[PlannedCall],
    *,
    timeout: float | None = None,
) -> list[ToolResult]:
    """The results of one step's calls, in order: recorded ones from their records, the
    others recorded (all of the step in one transaction) and then sent at once."""
    calls = run.deps.calls
    known = [await calls.find(run.id, node_id, step, i) for i in range(len(planned))]
    lost = [r for r in known if r is not None and r.status == CallStatus.SENT]
    registry = run.deps.tools
    if lost:
        blocked = [r for r in lost if not (_idempotent(registry, r.tool) or r.decision == "retry")]
        if blocked:
            raise NeedsAttention(run.id, [r.view() for r in blocked])
    agent = run.record.agent
    recording = [
        NewCall(
            i,
            call.call_id,
            call.tool,
            call.arguments,
            denied=registry is not None and not registry.allowed(agent, call.tool),
        )
        if record is None
        else NewCall(i, record.call_id, record.tool, record.arguments)  # lost: again
        for i, (call, record) in enumerate(zip(planned, known, strict=True))
        if record is None or record.status == CallStatus.SENT
    ]
    limit = run.spec.budget.max_tool_calls
    try:
        recorded = (
            await calls.sent_step(run.id, node_id, step, recording, limit) if recording else []
        )
    except CallBudgetSpent as exc:
        raise BudgetExceeded("max_tool_calls", str(exc)) from None
    fresh_records = {r.seq: r for r in recorded}
    records: list[CallRecord] = []
    for i, record in enumerate(known):
        settled = fresh_records.get(i) or record
        assert settled is not None  # every place is recorded now
        records.append(settled)
    return list(await asyncio.gather(*(_settle(run, record, timeout) for record in records)))


async def _settle(run: RunContext, record: CallRecord, timeout: float | None) -> ToolResult:
    """A recorded call's result: from its record, or sent now and recorded."""
    if record.status in (CallStatus.DONE, CallStatus.SKIPPED) and record.result is not None:
        given = record.result
        return ToolResult(
            bool(record.ok), given.get("text", ""), given.get("value"), given.get("error"), 0.0
        )
    key = (run.id, record.node_id, record.step, record.seq)
    if record.status == CallStatus.DENIED:
        agent = run.record.agent
        error = f"agent {agent!r} may not call tool {record.tool!r} (see [tools.permissions])"
        result = ToolResult(False, error, None, error, 0.0)
        await run.deps.calls.answered(
            *key, ok=False, result=_stored(result), seconds=0.0, status=CallStatus.DENIED
        )
        return result
    result = await _send(run, record, timeout)
    await run.deps.calls.answered(
        *key, ok=result.ok, result=_stored(result), seconds=result.seconds
    )
    return result


async def _send(run: RunContext, record: CallRecord, timeout: float | None) -> ToolResult:
    registry = run.deps.tools
    started = time.perf_counter()
    if registry is None:
        error = "no tools are registered here (see [tools] in the config file)"
        return ToolResult(False, error, None, error, 0.0)
    try:
        return await registry.call(
            record.tool, record.arguments, agent=run.record.agent, timeout=timeout
        )
    except PcrtError as exc:  # refused before sending: unknown tool, bad arguments
        return ToolResult(False, str(exc), None, str(exc), time.perf_counter() - started)


def _stored(result: ToolResult) -> dict[str, Any]:
    return {"text": result.text, "value": result.value, "error": result.error}


def _idempotent(registry: ToolRegistry | None, name: str) -> bool:
    if registry is None:
        return False
    try:
        return registry.get(name).idempotent
    except PcrtError:
        return False
