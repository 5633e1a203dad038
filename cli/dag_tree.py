"""``pcrt dag status``'s picture: a run as a tree of its nodes, and the status colours
every ``pcrt dag`` command shares."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich.text import Text
from rich.tree import Tree

from pcrt.cache.status import NodeStatus, RunStatus
from pcrt.runtime.dag import dependencies, parse_dag
from pcrt.runtime.errors import DagInvalid

__all__ = ["STATUS_STYLE", "nodes_done", "run_tree"]

# rich styles (and click colours) of run and node statuses
STATUS_STYLE: dict[str, str] = {
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "red",
    RunStatus.BUDGET_EXCEEDED: "red",
    RunStatus.CANCELLED: "yellow",
    RunStatus.INTERRUPTED: "magenta",
    RunStatus.RUNNING: "cyan",
    RunStatus.PENDING: "dim",
    RunStatus.MIGRATED: "blue",
    RunStatus.NEEDS_ATTENTION: "bold yellow",
}
# a tool call's status (pcrt.cache.status.CallStatus)
CALL_STYLE: dict[str, str] = {
    "done": "green",
    "sent": "bold yellow",
    "denied": "red",
    "skipped": "yellow",
}


def nodes_done(statuses: Iterable[str]) -> int:
    """Nodes with an output (``nodes_executed`` counts executions: resumes add to it)."""
    return sum(1 for status in statuses if status == NodeStatus.SUCCEEDED)


def run_tree(view: dict[str, Any], document: dict[str, Any]) -> Tree:
    """The run and one branch per node: status, tokens, time, where, cache, checkpoint."""
    status = view["status"]
    done = nodes_done(n["status"] for n in view["nodes"])
    root = Tree(
        Text.assemble(
            ("run ", "bold"),
            (view["id"], "bold"),
            f"  {view['dag']}  ",
            (status, f"bold {STATUS_STYLE.get(status, '')}"),
            (
                f"  {done}/{len(view['nodes'])} nodes done, {view['tokens_used']} tokens",
                "dim",
            ),
        )
    )
    if view.get("error"):
        root.add(Text(f"error: {view['error']}", style="red"))
    try:
        deps = dependencies(parse_dag(document))
    except DagInvalid:
        deps = {}
    for node in view["nodes"]:
        st = node["status"]
        branch = root.add(
            Text.assemble(
                (node["node_id"], "bold"), f"  {node['type']}  ", (st, STATUS_STYLE.get(st, ""))
            )
        )
        for fact in _node_facts(node, sorted(deps.get(node["node_id"], ()))):
            branch.add(fact)
        for call in (c for c in view.get("tool_calls", ()) if c["node"] == node["node_id"]):
            branch.add(_call_line(call))
    return root


def _call_line(call: dict[str, Any]) -> Text:
    """A tool call: its step, tool, arguments, outcome, result size and time."""
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    if len(arguments) > 80:
        arguments = arguments[:77] + "..."
    status = call["status"]
    outcome = status if call["ok"] is not False or status == "denied" else "failed"
    facts = [f"{call['result_bytes']} B" if call["result_bytes"] is not None else ""]
    if call["seconds"] is not None:
        facts.append(f"{call['seconds']:.2f} s")
    if call["attempts"] > 1:
        facts.append(f"{call['attempts']} attempts")
    if call.get("error"):
        facts.append(str(call["error"])[:80])
    return Text.assemble(
        ("call ", "dim"),
        f"step {call['step']}  {call['tool']}({arguments})  ",
        (outcome, CALL_STYLE.get(status, "")),
        ("  " + ", ".join(f for f in facts if f), "dim"),
    )


def _node_facts(node: dict[str, Any], after: list[str]) -> list[Text]:
    facts: list[Text] = []
    if after:
        facts.append(Text(f"after: {', '.join(after)}", style="dim"))
    if node["prompt_tokens"] is not None or node["completion_tokens"] is not None:
        # a node's completion is counted when it ends: while it runs, say so (and how far
        # its last checkpoint got) rather than "completion 0"
        completion = f"completion {node['completion_tokens'] or 0}"
        if node["status"] == "running" and not node["completion_tokens"]:
            so_far = node["checkpoint_tokens"]
            completion = "completion: generating" + (
                f" ({so_far} at its last checkpoint)" if so_far else ""
            )
        facts.append(
            Text(
                f"tokens: prompt {node['prompt_tokens'] or 0}, "
                f"cached {node['cached_tokens'] or 0}, {completion}"
            )
        )
    if node["seconds"] is not None:
        facts.append(Text(f"time: {node['seconds']:.2f} s"))
    if node["ran_on"]:
        model = f" ({node['model']})" if node["model"] else ""
        facts.append(Text(f"ran on: {node['ran_on']}{model}"))
    routing = node.get("routing") or {}
    for attempt in routing.get("attempts") or ():
        facts.append(Text(f"fell back from {attempt['node']}: {attempt['error']}", style="yellow"))
    if routing.get("reason"):
        facts.append(Text(f"routed: {routing['reason']}", style="dim"))
    if node.get("child_run_id"):
        facts.append(Text(f"subgraph run: {node['child_run_id']} (pcrt dag status it)"))
    if node["cache_hit"]:
        facts.append(Text("cache hit: no inference", style="green"))
    if node["resumed_from_checkpoint"]:
        facts.append(Text("resumed from its checkpoint", style="magenta"))
    if node["checkpoint_tokens"]:
        facts.append(Text(f"checkpoint: {node['checkpoint_tokens']} tokens"))
    if node["error"]:
        facts.append(Text(f"error: {node['error']}", style="red"))
    return facts
