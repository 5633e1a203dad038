"""The pure parts of a subgraph call; ``calls.py`` does the running.

A ``type: subgraph`` node runs its callee as a child run of its own (recorded with a
pointer to the calling run and node), so checkpoints, budgets, resume and context
continuation work inside it exactly as in any run. This module decides what that child
is: its document (the callee, carrying the library it can reach, under the budget the
caller has left), its result (the signature's outputs) and whether the result may be
cached, under which key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pcrt.runtime.dag.library import Library, with_library
from pcrt.runtime.dag.spec import Budget, DagSpec, ForkNode, LlmNode, tools_called
from pcrt.runtime.dag.template_render import evaluate_async
from pcrt.runtime.dag.templates import DagSandbox, make_scope
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.errors import InvalidRequest

__all__ = [
    "budget_limit",
    "call_cache_key",
    "call_outputs",
    "child_budget",
    "child_spec",
    "generating_nodes",
    "is_deterministic",
    "jsonable",
]

_DEFAULT_TEMPERATURE = SamplingParams.model_fields["temperature"].default
_LIMIT = re.compile(r"^budget exceeded: (\w+) \((.*)\)$", re.S)


def child_budget(
    own: Budget, caller: Budget, tokens_used: int, nodes_executed: int, calls_made: int = 0
) -> Budget:
    """The callee's budget, tightened to what the caller has left (at least one of each,
    since the caller only starts a node while it has some). The caller's timeout already
    bounds the call, so the callee keeps its own."""
    tokens_left = None if caller.max_tokens is None else max(1, caller.max_tokens - tokens_used)
    nodes_left = None if caller.max_nodes is None else max(1, caller.max_nodes - nodes_executed)
    calls = caller.max_tool_calls
    calls_left = None if calls is None else max(1, calls - calls_made)
    return Budget(
        max_tokens=_tighter(own.max_tokens, tokens_left),
        max_nodes=_tighter(own.max_nodes, nodes_left),
        timeout_sec=own.timeout_sec,
        max_tool_calls=_tighter(own.max_tool_calls, calls_left),
    )


def child_spec(callee: DagSpec, library: Library, budget: Budget) -> DagSpec:
    """The document a call's child run records: the callee with every library DAG it can
    reach (so that the child resumes on its own) and its budget."""
    carried = with_library(callee, library.closure(callee))
    return carried.model_copy(update={"budget": budget})


def generating_nodes(spec: DagSpec, library: Library) -> Iterator[LlmNode | ForkNode]:
    """Every node that generates in ``spec`` and the library DAGs it reaches."""
    for dag in (spec, *library.closure(spec).values()):
        for node in dag.nodes.values():
            if node.generates:
                yield node


def calls_tools(spec: DagSpec, library: Library) -> bool:
    """Whether running ``spec`` may call a tool: a tool or agent node in it or in a
    library DAG it reaches."""
    reached = (spec, *library.closure(spec).values())
    return any(tools_called(n) for dag in reached for n in dag.nodes.values())


def is_deterministic(spec: DagSpec, library: Library) -> bool:
    """Whether a call gives the same outputs for the same inputs and does nothing else:
    every generation at temperature 0 or with a fixed seed, and no tool called (a tool
    acts on the world: a cached call would never send the email it stands for)."""
    if calls_tools(spec, library):
        return False
    return all(
        node.seed is not None or _temperature(node) == 0 for node in generating_nodes(spec, library)
    )


def call_cache_key(
    path: str,
    inputs: Mapping[str, Any],
    document: Mapping[str, Any],
    model_sha256s: list[str],
    engine_version: str,
) -> str:
    """The subgraph cache key of a call: the callee's path, the bound inputs, the child's
    whole document (the callee, its reachable library and budget: any change to them is
    another key), the sha256 of every model it uses and the engine version."""
    material = {
        "kind": "subgraph",
        "path": path,
        "inputs": inputs,
        "document": document,
        "models": sorted(model_sha256s),
        "engine": engine_version,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


async def call_outputs(
    env: DagSandbox,
    callee: DagSpec,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    *,
    node: str,
) -> dict[str, Any]:
    """The call's output: each signature output's ``value`` expression evaluated over the
    child's inputs and node outputs (in the template worker unless it is plain), else the
    output of the callee's node of that name."""
    assert callee.signature is not None  # validation refuses a /lib DAG without one
    scope = make_scope(inputs, outputs)
    result: dict[str, Any] = {}
    for name, spec in callee.signature.outputs.items():
        if spec.value is not None:
            value = await evaluate_async(env, spec.value, scope, node=node)
        else:
            value = outputs[name]
        result[name] = jsonable(value, f"node {node!r}: output {name!r} of {callee.dag}")
    return result


def jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data: a template may produce a generator (``map``), and a
    run's records are JSON."""
    try:
        return json.loads(json.dumps(value, default=_as_list))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{where}: {exc}") from None


def budget_limit(error: str | None) -> tuple[str, str]:
    """The limit and detail of a child run's ``budget exceeded: LIMIT (DETAIL)`` error."""
    found = _LIMIT.match(error or "")
    return (found[1], found[2]) if found else ("budget", error or "exceeded")


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, Iterator | set | frozenset):
        return list(value)
    raise TypeError(f"a {type(value).__name__} is not JSON data")


def _tighter(own: int | None, left: int | None) -> int | None:
    if own is None or left is None:
        return left if own is None else own
    return min(own, left)


def _temperature(node: LlmNode | ForkNode) -> float:
    return node.temperature if node.temperature is not None else _DEFAULT_TEMPERATURE
