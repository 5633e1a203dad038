"""Running a ``subgraph`` node: the call of a ``/lib`` DAG from the run's library.

The call renders its inputs and binds them to the callee's signature, then executes the
callee as a child run in the same store (``subgraph.py`` has the pure parts), under what
is left of the caller's budget. Its tokens and node executions count for the caller; a
resume of the caller resumes the child, whose finished nodes stay finished. A
deterministic call is cached whole.

The calling node's ``route`` and ``complexity`` are written into the child's document as
the defaults of the callee's nodes (``DagSpec.called_with``; a callee node's own setting
wins), so the child's nodes are routed like any node, its resume and a peer it moves to
see the same hints, and the call's cache key (over that document) tells a call kept local
from one sent to a peer, which may resolve a tag to another model.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from pcrt.cache.runs import NodeFinished, NodeRecord, NodeStarted, RunNotFound, RunRecord
from pcrt.cache.status import CallStatus, NodeStatus, RunStatus
from pcrt.cache.store import utc_now
from pcrt.runtime.dag.context import ENGINE_VERSION, RunContext
from pcrt.runtime.dag.events import DagEvent, DagEventKind, EventSink
from pcrt.runtime.dag.library import library_from_documents
from pcrt.runtime.dag.load import parse_dag
from pcrt.runtime.dag.spec import DagSpec, SubgraphNode
from pcrt.runtime.dag.subgraph import (
    budget_limit,
    call_cache_key,
    call_outputs,
    child_budget,
    child_spec,
    generating_nodes,
    is_deterministic,
    jsonable,
)
from pcrt.runtime.dag.template_render import render_value_async
from pcrt.runtime.dag.validate import bind_inputs
from pcrt.runtime.errors import (
    BudgetExceeded,
    DagInvalid,
    InvalidRequest,
    NeedsAttention,
    PcrtError,
)
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["ExecuteRun", "call_subgraph"]

ExecuteRun: TypeAlias = Callable[[str, EventSink], Awaitable[RunRecord]]
"""Executes (or resumes) a run by id, its events to the sink: ``DagRunner.execute``."""


@dataclass(frozen=True)
class _ChildRun:
    """The child run a call executes, its document and the call's cache key."""

    record: RunRecord
    spec: DagSpec
    key: str | None


@dataclass(frozen=True)
class _CacheHit:
    output: dict[str, Any]


async def call_subgraph(
    run: RunContext, node: SubgraphNode, scope: dict[str, Any], execute: ExecuteRun
) -> dict[str, Any]:
    """The call's output: the callee run as a child run (or the child an earlier attempt
    started, resumed), or the subgraph cache's answer; the call recorded on the calling
    node. A child that breaks its budget breaks the caller's."""
    deps = run.deps
    started = time.perf_counter()
    prepared = await _prepare_call(run, node, scope)
    if isinstance(prepared, _CacheHit):
        return prepared.output
    child, spec = prepared.record, prepared.spec
    final = await execute(child.id, _forwarded(run.emit))
    if final.status == RunStatus.BUDGET_EXCEEDED:
        limit, detail = budget_limit(final.error)
        raise BudgetExceeded(limit, f"{detail}, in {node.dag} called by node {node.id!r}")
    if final.status == RunStatus.NEEDS_ATTENTION:  # the person decides for the caller
        waiting = [c for c in await deps.calls.of_run(child.id) if c.status == CallStatus.SENT]
        raise NeedsAttention(run.id, [c.view() for c in waiting])
    if final.status != RunStatus.SUCCEEDED:
        raise PcrtError(
            f"node {node.id!r}: {node.dag} (run {child.id}) {final.status}: {final.error}"
        )
    records = await deps.runs.nodes(child.id)
    outputs = {n.node_id: n.output for n in records if n.status == NodeStatus.SUCCEEDED}
    output = await call_outputs(deps.env, spec, final.inputs, outputs, node=node.id)
    tokens = final.tokens_used
    finished = NodeFinished(
        output=output,
        ran_on=deps.ran_on,
        spent_tokens=tokens,
        executions=final.nodes_executed,
        prompt_tokens=sum(n.prompt_tokens or 0 for n in records),
        completion_tokens=tokens,
        cached_tokens=sum(n.cached_tokens or 0 for n in records),
        seconds=time.perf_counter() - started,
    )
    totals = await deps.runs.finish_node(run.id, node.id, finished)
    if prepared.key is not None:
        await deps.runs.cache_put(prepared.key, node.dag, output, tokens, deps.cache_entries)
    run.stop_past_budget(totals)
    return output


async def _prepare_call(
    run: RunContext, node: SubgraphNode, scope: dict[str, Any]
) -> _ChildRun | _CacheHit:
    """The child an earlier attempt started, else a new one; or, for a new call the
    cache knows, its result (recorded on the calling node)."""
    deps = run.deps
    child = await _existing_child(run, await deps.runs.node(run.id, node.id))
    if child is not None:  # resumed: the child knows its document and inputs
        source = f"run {child.id}"
        spec = await to_thread_to_completion(lambda: parse_dag(child.spec, source=source))
        key = await _call_key(run, node, spec, child.inputs)
        await deps.runs.update_node(run.id, node.id, NodeStarted(ran_on=deps.ran_on))
        return _ChildRun(child, spec, key)
    callee = run.library.dags.get(node.dag)
    if callee is None:
        raise PcrtError(f"node {node.id!r}: the library of this run has no {node.dag}")
    inputs = await _call_inputs(run, node, callee, scope)
    spent = await run.counters()
    made = len(await deps.calls.of_run(run.id))
    budget = child_budget(
        callee.budget, run.spec.budget, spent.tokens_used, spent.nodes_executed, made
    )
    spec = child_spec(callee, run.library, budget).called_with(node.route, node.complexity)
    key = await _call_key(run, node, spec, inputs)
    cached = await deps.runs.cache_get(key) if key is not None else None
    if cached is not None:
        hit = NodeFinished(
            output=cached,
            ran_on=deps.ran_on,
            spent_tokens=0,
            completion_tokens=0,
            seconds=0.0,
            cache_hit=True,
        )
        await deps.runs.finish_node(run.id, node.id, hit)
        return _CacheHit(cached)
    started = NodeStarted(ran_on=deps.ran_on, started_at=utc_now())
    await deps.runs.update_node(run.id, node.id, started)
    # a call's generations bill the caller's agent
    record = await deps.record_run(spec, inputs, parent=(run.id, node.id), agent=run.record.agent)
    return _ChildRun(record, spec, key)


async def _existing_child(run: RunContext, record: NodeRecord) -> RunRecord | None:
    if record.child_run_id is None:
        return None
    try:
        return await run.deps.runs.get_run(record.child_run_id)
    except RunNotFound:  # a run moved here from a peer comes without its children
        return None


async def _call_inputs(
    run: RunContext, node: SubgraphNode, callee: DagSpec, scope: dict[str, Any]
) -> dict[str, Any]:
    """The node's inputs rendered over the caller's values, bound to the callee's
    signature (defaults filled in, types checked)."""
    rendered = {
        name: jsonable(
            await render_value_async(run.deps.env, value, scope, node=node.id),
            f"node {node.id!r}: input {name!r}",
        )
        for name, value in node.inputs.items()
    }
    try:
        return bind_inputs(callee, rendered)
    except DagInvalid as exc:
        reasons = "; ".join(str(p) for p in exc.problems)
        raise InvalidRequest(
            f"node {node.id!r}: the inputs do not fit {node.dag}'s signature: {reasons}"
        ) from None


async def _call_key(
    run: RunContext, node: SubgraphNode, spec: DagSpec, inputs: dict[str, Any]
) -> str | None:
    """The call's subgraph cache key, or None when it must not be cached."""
    deps = run.deps
    carried = library_from_documents(spec.library)
    if not node.cache or not is_deterministic(spec, carried):
        return None
    names = {deps.registry.resolve(n.model or n.tag).name for n in generating_nodes(spec, carried)}
    model_sha256s = []
    for name in sorted(names):
        async with deps.lease(name) as engine:  # the sha256 the engine checked on load
            model_sha256s.append(engine.compat_key.model_sha256)
    return call_cache_key(node.dag, inputs, spec.document(), model_sha256s, ENGINE_VERSION)


def _forwarded(emit: EventSink) -> EventSink:
    """A child run's events for the caller's listeners (they carry the child's run id),
    without its start and end: the calling node's own events bracket them."""

    def forward(event: DagEvent) -> None:
        if event.kind not in (DagEventKind.RUN_STARTED, DagEventKind.RUN_FINISHED):
            emit(event)

    return forward
