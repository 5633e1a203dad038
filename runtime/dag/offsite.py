"""Where a generating node runs, when peers may take it (issue 6).

Routing decides per node: candidates in order, the first the choice and the rest its
fallbacks. A node runs here (``local.py``), as one chat completion on an OpenAI-compatible
peer, or, on a pcrt peer, with the later nodes routed alike as one subgraph sent whole
(its "group"). A peer that fails hands the node to the next candidate; a node's partial
remote output is dropped and recomputed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import jsonschema

from pcrt.cache.runs import NodeFinished, NodeRequeued, NodeRouted, NodeStarted, RunCounters
from pcrt.cache.status import NodeStatus, RunStatus
from pcrt.cache.store import utc_now
from pcrt.routing.policy import Candidate, Decision, Work
from pcrt.runtime.dag import local
from pcrt.runtime.dag.context import RunContext
from pcrt.runtime.dag.events import DagEvent, DagEventKind
from pcrt.runtime.dag.spec import (
    AgentNode,
    ForkNode,
    LlmNode,
    Node,
    SubgraphNode,
    ToolNode,
    tools_called,
)
from pcrt.runtime.dag.template_render import render_async
from pcrt.runtime.dag.validate import dependencies
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.errors import NoRoute, PcrtError, PeerError, PeerUnavailable

__all__ = ["generate_routed", "peer_group", "tools_needed", "tools_on_peer"]

log = logging.getLogger(__name__)

_Hints = tuple[Any, ...]  # route, complexity, model, tag: nodes alike go to a peer together


async def generate_routed(
    run: RunContext, node: LlmNode | ForkNode, scope: dict[str, Any]
) -> dict[str, Any]:
    """The node's output, by its id, with those of the nodes that went with it to a pcrt
    peer: generated where routing decides, here when there are no peers or the node
    says ``route: local``."""
    decision = await _decide(run, node, scope)
    if decision is None:
        return {node.id: await local.generate(run, node, scope)}
    remote = run.deps.remote
    assert remote is not None
    if decision.chosen is None:
        if node.route == "peer":
            raise NoRoute(f"node {node.id}: {decision.reason}")
        return {node.id: await local.generate(run, node, scope)}  # local decides: errors
    attempts: list[dict[str, str]] = []
    for candidate in decision.candidates:
        routing = {"reason": decision.reason, "ran_on": candidate.node, "attempts": list(attempts)}
        if candidate.kind == "local":
            await run.deps.runs.update_node(run.id, node.id, NodeRouted(routing))
            return {node.id: await local.generate(run, node, scope)}
        try:
            if candidate.kind == "pcrt":
                return await _subgraph_on_peer(run, node, candidate, routing)
            return {node.id: await _generate_on_peer(run, node, scope, candidate, routing)}
        except PeerError as exc:
            if isinstance(exc, PeerUnavailable):
                remote.failed(exc)  # out of rotation now, not at the next check
            attempts.append({"node": candidate.node, "error": str(exc)})
            log.warning("node %s: %s; trying the next candidate", node.id, exc)
            data = {"from": candidate.node, "error": str(exc)}
            run.emit(DagEvent(DagEventKind.FALLBACK, run.id, node.id, data))
    tried = "; ".join(f"{a['node']}: {a['error']}" for a in attempts)
    raise PeerUnavailable(f"node {node.id}: every candidate failed ({tried})", peer="")


async def _decide(
    run: RunContext, node: LlmNode | ForkNode, scope: dict[str, Any]
) -> Decision | None:
    """Where the node should run, or None for "here, no question" (no peers, or the
    node says ``route: local``)."""
    remote = run.deps.peers
    if remote is None or node.route == "local":
        return None
    text = (node.system or "") + (node.prompt or "")
    with contextlib.suppress(PcrtError):
        text = await render_async(run.deps.env, node.prompt or "", scope, node=node.id)
    work = Work(
        # neither model nor tag: each node offers its best model (here, the default)
        model=node.model,
        tag=node.tag,
        prompt_tokens=len(text) // 4,  # an estimate: no tokenizer for a peer's model
        max_tokens=node.max_tokens or 512,
        has_schema=node.output_schema is not None,
        complexity=node.complexity,
        route=node.route,
        timeout_s=run.spec.budget.timeout_sec,
    )
    return remote.decide(work)


async def _generate_on_peer(
    run: RunContext,
    node: LlmNode | ForkNode,
    scope: dict[str, Any],
    candidate: Candidate,
    routing: dict[str, Any],
) -> Any:
    """One generation as a chat completion on an OpenAI-compatible peer."""
    deps, run_id, node_id = run.deps, run.id, node.id
    remote = deps.remote
    assert remote is not None
    messages, _ = await local.conversation(run, node, scope, None)
    sampling = SamplingParams(**node.sampling())
    left = await run.tokens_left()
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens if left is None else min(sampling.max_tokens, left),
    }
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if run.record.agent:
        params["user"] = run.record.agent  # OpenAI's end-user field: the peer's billing
    samples = node.samples if isinstance(node, ForkNode) and node.samples else 1
    if samples > 1:
        params["n"] = samples
    start = NodeStarted(
        ran_on=candidate.node, started_at=utc_now(), model=candidate.model, routing=routing
    )
    await deps.runs.update_node(run_id, node_id, start)

    def on_text(index: int, text: str) -> None:
        run.emit(DagEvent(DagEventKind.TOKEN, run_id, node_id, {"index": index, "text": text}))

    result = await remote.chat(
        candidate,
        [{"role": m.role, "content": m.text()} for m in messages],
        params,
        node.output_schema,
        on_text,
    )
    texts = list(result.texts) + [""] * (samples - len(result.texts))
    try:
        outputs = [local.parse_output(node, text) for text in texts[:samples]]
    except PcrtError as exc:
        raise PeerError(f"{exc} (from peer {candidate.node})", peer=candidate.node) from None
    if node.output_schema is not None:
        for value in outputs:
            try:
                jsonschema.validate(value, node.output_schema)
            except jsonschema.ValidationError as exc:
                # the peer's constrained decoding failed us (llama-cpp-python's server
                # ignores the grammar at temperature 0): the next candidate tries
                raise PeerError(
                    f"node {node_id}: peer {candidate.node} answered JSON that breaks the "
                    f"node's schema: {exc.message}",
                    peer=candidate.node,
                ) from None
    output: Any = outputs if isinstance(node, ForkNode) else outputs[0]
    tokens = result.completion_tokens
    finished = NodeFinished(
        output=output,
        ran_on=candidate.node,
        spent_tokens=tokens,
        model=candidate.model,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=tokens,
        cached_tokens=result.cached_tokens,
        seconds=result.seconds,
    )
    totals = await deps.runs.finish_node(run_id, node_id, finished)
    await run.bill(node_id)
    run.stop_past_budget(totals)
    return output


def peer_group(
    run: RunContext, node: LlmNode | ForkNode, tools_there: frozenset[str] = frozenset()
) -> list[str]:
    """The subgraph that goes whole with ``node``: it and the later nodes routed alike
    (same route, complexity, model and tag) whose inputs all come from finished nodes or
    from the group itself; asserts and branch forks over the group go along, and so do
    subgraph calls without routing hints or with the same route and complexity. A node
    that calls tools (a tool or agent node, a subgraph call whose callee has one) goes
    only to a peer whose tools they are and are idempotent there (``tools_there``): its
    calls are recorded on the peer, so if the peer fails mid-call and the node runs again
    elsewhere, a call may be sent twice, which only an idempotent tool allows."""
    deps = dependencies(run.spec)
    hints = _hints(node)
    group = [node.id]
    changed = True
    while changed:
        changed = False
        for other_id, other in run.spec.nodes.items():
            if other_id in group or other_id in run.outputs:
                continue
            if not deps[other_id] & set(group):
                continue  # not downstream of the group
            if not deps[other_id] <= set(group) | run.outputs.keys():
                continue
            if not tools_needed(run, other) <= tools_there:
                continue  # its tools are not there, or not safe to send twice: it runs here
            if (other.generates or isinstance(other, AgentNode)) and _hints(other) != hints:
                continue  # routed differently: it decides on its own
            if isinstance(other, SubgraphNode) and _call_hints(other) not in (None, hints[:2]):
                continue  # its callee is routed by its own hints, from here
            group.append(other_id)
            changed = True
    return group


async def tools_on_peer(run: RunContext, node: ToolNode | AgentNode) -> dict[str, Any]:
    """A tool or agent node whose tools are not registered here: run on a trusted pcrt
    peer that offers them as idempotent (``PeerTable.remote_tools``: a call lost with a
    failing peer may go again elsewhere), the next candidate when one fails."""
    remote = run.deps.peers
    needed = tools_needed(run, node)
    if remote is None:
        raise NoRoute(f"node {node.id}: its tools {sorted(needed)} are not registered here")
    model = node.model if isinstance(node, AgentNode) else None
    tag = node.tag if isinstance(node, AgentNode) else None
    work = Work(model=model, tag=tag, route="peer", peer_kinds=frozenset({"pcrt"}))
    decision = remote.decide(work)
    candidates = [c for c in decision.candidates if needed <= c.idempotent_tools]
    if not candidates:
        raise NoRoute(
            f"node {node.id}: no peer runs the tools {sorted(needed)} ({decision.reason})"
        )
    attempts: list[dict[str, str]] = []
    for candidate in candidates:
        routing = {"reason": "its tools are there", "ran_on": candidate.node, "attempts": attempts}
        try:
            return await _group_on_peer(run, node.id, [node.id], candidate, routing)
        except PeerError as exc:
            if isinstance(exc, PeerUnavailable):
                remote.failed(exc)
            attempts = [*attempts, {"node": candidate.node, "error": str(exc)}]
            data = {"from": candidate.node, "error": str(exc)}
            run.emit(DagEvent(DagEventKind.FALLBACK, run.id, node.id, data))
    tried = "; ".join(f"{a['node']}: {a['error']}" for a in attempts)
    raise PeerUnavailable(f"node {node.id}: every peer failed ({tried})", peer="")


async def _subgraph_on_peer(
    run: RunContext, node: LlmNode | ForkNode, candidate: Candidate, routing: dict[str, Any]
) -> dict[str, Any]:
    """Send the node's subgraph whole to a pcrt peer; record what comes back."""
    group = peer_group(run, node, candidate.idempotent_tools)
    return await _group_on_peer(run, node.id, group, candidate, routing)


async def _group_on_peer(
    run: RunContext,
    head: str,
    group: list[str],
    candidate: Candidate,
    routing: dict[str, Any],
) -> dict[str, Any]:
    """Send ``group`` (``head`` and the nodes going with it) to a pcrt peer as one
    subgraph; record what comes back."""
    deps, run_id = run.deps, run.id
    remote = deps.remote
    assert remote is not None
    limit = run.spec.budget.max_nodes
    if limit is not None:
        executed = (await run.counters()).nodes_executed
        if executed + len(group) > limit:
            group = group[: max(1, limit - executed)]  # no more than the budget
    payload = _payload(run, group, await run.tokens_left())
    for node_id in group:
        if node_id != head:
            data: dict[str, Any] = {"type": run.spec.nodes[node_id].type}
            run.emit(DagEvent(DagEventKind.NODE_STARTED, run_id, node_id, data))
        start = NodeStarted(ran_on=candidate.node, started_at=utc_now(), routing=routing)
        await deps.runs.update_node(run_id, node_id, start)
    timeout = run.spec.budget.timeout_sec
    try:
        result = await remote.subgraph(candidate, payload, timeout, run.record.agent)
        if result.get("status") != RunStatus.SUCCEEDED:  # the next candidate may do better
            raise PeerError(
                f"the subgraph from node {head} failed on peer {candidate.node}: "
                f"{result.get('error') or result.get('status')}",
                peer=candidate.node,
            )
    except PeerError:
        for node_id in group:  # back to waiting: the next candidate decides for them
            if node_id != head:
                await deps.runs.update_node(run_id, node_id, NodeRequeued())
        raise
    records = result["nodes"]
    calls = result.get("tool_calls")
    if isinstance(calls, list) and calls:  # made there: recorded here too (status, budget)
        await deps.calls.imported(run_id, [c for c in calls if c.get("node") in group])
    outputs: dict[str, Any] = {}
    totals: RunCounters | None = None
    for node_id in group:
        rec = records.get(node_id)
        if not isinstance(rec, dict) or rec.get("status") != NodeStatus.SUCCEEDED:
            raise PcrtError(f"peer {candidate.node} did not finish node {node_id}")
        tokens = rec.get("completion_tokens")
        tokens = tokens if isinstance(tokens, int) else 0
        finished = NodeFinished(
            output=rec.get("output"),
            ran_on=candidate.node,
            spent_tokens=tokens,
            model=rec.get("model"),
            prompt_tokens=rec.get("prompt_tokens"),
            completion_tokens=tokens,
            cached_tokens=rec.get("cached_tokens"),
            seconds=rec.get("seconds"),
            cache_hit=bool(rec.get("cache_hit")),
        )
        totals = await deps.runs.finish_node(run_id, node_id, finished)
        sent = run.spec.nodes[node_id]
        # generations, and calls whose generations all ran inside them there; not
        # branch forks or asserts, which generate nothing of their own
        if sent.generates or isinstance(sent, SubgraphNode | AgentNode):
            await run.bill(node_id)
        outputs[node_id] = rec.get("output")
        if node_id != head:
            data = {"status": NodeStatus.SUCCEEDED, "output": outputs[node_id]}
            run.emit(DagEvent(DagEventKind.NODE_FINISHED, run_id, node_id, data))
    assert totals is not None  # the group holds the node itself
    run.stop_past_budget(totals)
    return outputs


def _payload(run: RunContext, group: list[str], left: int | None) -> dict[str, Any]:
    """What a pcrt peer runs: the group's nodes, never sent on again, and every upstream
    node their templates and contexts reach, as done, under what is left of the budget
    (``left`` tokens)."""
    deps = dependencies(run.spec)
    needed: set[str] = set()
    frontier = [d for g in group for d in deps[g]]
    while frontier:  # every upstream node the group's templates and contexts reach
        current = frontier.pop()
        if current not in needed and current not in group:
            needed.add(current)
            frontier.extend(deps[current])
    document = run.spec.document()
    nodes_doc = {}
    for node_id in [*sorted(needed), *group]:
        raw = dict(document["nodes"][node_id])
        if node_id in group and raw.get("type") in ("llm", "fork", "subgraph", "agent"):
            # it runs there, never sent on again (a call's callee inherits it)
            raw["route"] = "local"
        nodes_doc[node_id] = raw
    budget = run.spec.budget
    document["nodes"] = nodes_doc
    if "signature" in document:
        # part of a callee: the peer answers with node records, not the callee's
        # outputs, which may name nodes it is not sent
        document["signature"] = {**document["signature"], "outputs": {}}
    document["budget"] = {
        k: v
        for k, v in {
            "max_tokens": None if left is None else max(1, left),
            "timeout_sec": budget.timeout_sec,
        }.items()
        if v is not None
    }
    return {
        "dag": document,
        "inputs": run.record.inputs,
        "done": {n: run.outputs[n] for n in sorted(needed)},
        "nodes": group,
    }


def tools_needed(run: RunContext, node: Node) -> frozenset[str]:
    """The tools running ``node`` calls: a tool node's, an agent's, and those of every
    tool and agent node a subgraph call reaches."""
    if not isinstance(node, SubgraphNode):
        return frozenset(tools_called(node))
    callee = run.library.dags.get(node.dag)
    if callee is None:
        return frozenset()
    reached = [callee, *run.library.closure(callee).values()]
    return frozenset(
        name for spec in reached for n in spec.nodes.values() for name in tools_called(n)
    )


def _hints(node: LlmNode | ForkNode | AgentNode) -> _Hints:
    """What routes a generating node."""
    return (node.route, node.complexity, node.model, node.tag)


def _call_hints(node: SubgraphNode) -> _Hints | None:
    """The routing hints a call gives its callee; None when it gives none."""
    if node.route == "auto" and node.complexity is None:
        return None
    return (node.route, node.complexity)
