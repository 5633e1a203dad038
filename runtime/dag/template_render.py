"""Where a DAG template runs, and the calls that run it: render, evaluate, assert.

A plain template (``template_bounds``) whose reads fit the budget runs in this process:
microseconds, once it is compiled. Anything else runs in the template worker, a child
process with a memory limit and a deadline (``template_worker``).

Each call comes in two forms. The ``*_async`` ones are the executor's, and nothing in
them that can take more than a millisecond runs on the event loop: a template seen for
the first time is parsed, bounded and compiled in a thread, a round trip to the worker
(up to its 2 s deadline) is awaited in the worker's own thread, and so is the work of a
failed assert's message. The others block, for tests and for the worker's child, which
runs everything in its own process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from jinja2 import Undefined, nodes
from jinja2.exceptions import TemplateSyntaxError

from pcrt.runtime.dag.template_bounds import PLAIN_SOURCE
from pcrt.runtime.dag.template_worker import jsonable
from pcrt.runtime.dag.templates import DagSandbox, Prepared, metering, scan_expression
from pcrt.runtime.errors import AssertFailed, RenderFailed
from pcrt.runtime.threads import to_thread_to_completion

__all__ = [
    "check_assert",
    "check_assert_async",
    "evaluate",
    "evaluate_async",
    "render",
    "render_async",
    "render_value",
    "render_value_async",
    "serve_request",
]

_LONE = re.compile(r"\{\{[-+]?(.*?)[-+]?\}\}", re.S)
_LONG = 1_024  # characters of a subgraph input the event loop does not parse itself
_SHOWN = 200  # characters of a value shown in an assertion message


def render(
    env: DagSandbox, source: str, scope: Mapping[str, Any], *, node: str | None = None
) -> str:
    """Render a template to text; any failure is a ``RenderFailed`` naming the node."""
    here = _plan(env, source, scope, expression=False)
    if here is None:
        return _text(source, _ask(env, "render", source, scope), node)
    return _render_here(here, source, scope, node)


async def render_async(
    env: DagSandbox, source: str, scope: Mapping[str, Any], *, node: str | None = None
) -> str:
    """``render``, for the event loop."""
    here = await _plan_async(env, source, scope, expression=False)
    if here is None:
        return _text(source, await _ask_async(env, "render", source, scope), node)
    return _render_here(here, source, scope, node)


def evaluate(
    env: DagSandbox, expression: str, scope: Mapping[str, Any], *, node: str | None = None
) -> Any:
    """Evaluate an expression to a Python value; undefined results are errors, not None."""
    here = _plan(env, expression, scope, expression=True)
    if here is None:
        return _value(expression, _ask(env, "evaluate", expression, scope), node)
    return _evaluate_here(env, here, expression, scope, node)


async def evaluate_async(
    env: DagSandbox, expression: str, scope: Mapping[str, Any], *, node: str | None = None
) -> Any:
    """``evaluate``, for the event loop."""
    here = await _plan_async(env, expression, scope, expression=True)
    if here is None:
        return _value(expression, await _ask_async(env, "evaluate", expression, scope), node)
    return _evaluate_here(env, here, expression, scope, node)


def render_value(
    env: DagSandbox, source: Any, scope: Mapping[str, Any], *, node: str | None = None
) -> Any:
    """A subgraph input: non-strings pass through, a lone ``{{ expr }}`` keeps its type,
    anything else renders to text."""
    if not isinstance(source, str):
        return source
    lone = _lone_expression(env, source, node)
    if lone is not None:
        return evaluate(env, lone, scope, node=node)
    return render(env, source, scope, node=node)


async def render_value_async(
    env: DagSandbox, source: Any, scope: Mapping[str, Any], *, node: str | None = None
) -> Any:
    """``render_value``, for the event loop."""
    if not isinstance(source, str):
        return source
    if len(source) > _LONG:
        lone = await to_thread_to_completion(_lone_expression, env, source, node)
    else:
        lone = _lone_expression(env, source, node)
    if lone is not None:
        return await evaluate_async(env, lone, scope, node=node)
    return await render_async(env, source, scope, node=node)


def check_assert(
    env: DagSandbox,
    expression: str,
    scope: Mapping[str, Any],
    *,
    node: str | None = None,
    message: str | None = None,
) -> None:
    """Raise ``AssertFailed`` (with the values the expression read) unless it is true."""
    here = _plan(env, expression, scope, expression=True)
    if here is None:
        verdict = _verdict(_ask(env, "assert", expression, scope))
    else:
        verdict = _assert_here(env, here, expression, scope)
    _settle(verdict, expression, node, message)


async def check_assert_async(
    env: DagSandbox,
    expression: str,
    scope: Mapping[str, Any],
    *,
    node: str | None = None,
    message: str | None = None,
) -> None:
    """``check_assert``, for the event loop."""
    here = await _plan_async(env, expression, scope, expression=True)
    if here is None:
        verdict = _verdict(await _ask_async(env, "assert", expression, scope))
    else:
        holds, reason = _holds(env, here, expression, scope)
        # the values it read: each one parsed and compiled, or asked of the worker
        values = {} if holds else await to_thread_to_completion(_values, env, expression, scope)
        verdict = {"holds": holds, "values": values, "reason": reason}
    _settle(verdict, expression, node, message)


def serve_request(env: DagSandbox, request: dict[str, Any]) -> dict[str, Any]:
    """One request in the template worker (``env`` runs templates here)."""
    op, source, scope = request["op"], request["source"], request["scope"]
    try:
        if op == "render":
            return {"ok": render(env, source, scope)}
        if op == "evaluate":
            return {"ok": evaluate(env, source, scope)}
        if op == "assert":
            here = env.prepare(source, expression=True)
            return {"ok": _assert_here(env, here, source, scope)}
    except RenderFailed as exc:
        return {"error": exc.reason}
    return {"error": f"unknown operation {op!r}"}


# -- here or there ------------------------------------------------------------------------


def _plan(
    env: DagSandbox, source: str, scope: Mapping[str, Any], *, expression: bool
) -> Prepared | None:
    """The template prepared to run here, or None: the worker runs it."""
    return _fits(env, env.prepare(source, expression), scope)


async def _plan_async(
    env: DagSandbox, source: str, scope: Mapping[str, Any], *, expression: bool
) -> Prepared | None:
    prepared = env.prepared(source, expression)
    if prepared is None:
        if env.worker is not None and len(source) > PLAIN_SOURCE:
            return None  # never plain: not even parsed here
        # first sight: parsing and compiling take milliseconds, more for a long one
        prepared = await to_thread_to_completion(env.prepare, source, expression)
    return _fits(env, prepared, scope)


def _fits(env: DagSandbox, prepared: Prepared, scope: Mapping[str, Any]) -> Prepared | None:
    if env.worker is None:  # the worker's own child: everything runs here
        return prepared
    if prepared.cost is not None and prepared.cost.fits(scope):
        return prepared
    return None


def _ask(env: DagSandbox, op: str, source: str, scope: Mapping[str, Any]) -> dict[str, Any]:
    assert env.worker is not None
    return env.worker.call({"op": op, "source": source, "scope": scope})


async def _ask_async(
    env: DagSandbox, op: str, source: str, scope: Mapping[str, Any]
) -> dict[str, Any]:
    assert env.worker is not None
    return await env.worker.call_async({"op": op, "source": source, "scope": scope})


# -- running here -------------------------------------------------------------------------


def _run(here: Prepared, scope: Mapping[str, Any]) -> Any:
    if here.error is not None:
        raise _CompileFailed(here.error)
    assert here.program is not None
    with metering():
        return here.program(scope)


class _CompileFailed(Exception):
    """A template that does not compile: its reason, as compiling it gave it."""


def _render_here(here: Prepared, source: str, scope: Mapping[str, Any], node: str | None) -> str:
    try:
        return str(_run(here, scope))
    except Exception as exc:  # jinja errors, and whatever a filter raises on odd values
        raise RenderFailed(source, _reason(exc), node=node) from None


def _evaluate_here(
    env: DagSandbox, here: Prepared, expression: str, scope: Mapping[str, Any], node: str | None
) -> Any:
    try:
        result = _run(here, scope)
        if isinstance(result, Undefined):
            bool(result)  # StrictUndefined raises here, with the sandbox's reason if any
        if env.worker is not None:  # the same data the worker would have answered
            return json.loads(json.dumps(result, default=jsonable))
        return result
    except Exception as exc:
        raise RenderFailed(expression, _reason(exc), node=node) from None


def _holds(
    env: DagSandbox, here: Prepared, expression: str, scope: Mapping[str, Any]
) -> tuple[bool, str | None]:
    try:
        return bool(_evaluate_here(env, here, expression, scope, None)), None
    except RenderFailed as exc:
        return False, exc.reason


def _assert_here(
    env: DagSandbox, here: Prepared, expression: str, scope: Mapping[str, Any]
) -> dict[str, Any]:
    holds, reason = _holds(env, here, expression, scope)
    values = {} if holds else _values(env, expression, scope)
    return {"holds": holds, "values": values, "reason": reason}


def _values(env: DagSandbox, expression: str, scope: Mapping[str, Any]) -> dict[str, str]:
    try:
        refs = scan_expression(env, expression).references
    except Exception:
        return {}
    shown: dict[str, str] = {}
    for ref in refs:
        try:
            value = repr(evaluate(env, ref.text, scope))
        except RenderFailed:
            value = "<undefined>"
        shown[ref.text] = value if len(value) <= _SHOWN else value[: _SHOWN - 3] + "..."
    return shown


def _lone_expression(env: DagSandbox, source: str, node: str | None) -> str | None:
    """The expression of a template that is one ``{{ expr }}`` and nothing else."""
    lone = _LONE.fullmatch(source)
    if lone is None:
        return None
    try:
        body = env.parse(source).body
    except TemplateSyntaxError as exc:
        raise RenderFailed(source, _reason(exc), node=node) from None
    if (
        len(body) == 1
        and isinstance(body[0], nodes.Output)
        and len(body[0].nodes) == 1
        and not isinstance(body[0].nodes[0], nodes.TemplateData)
    ):
        return lone[1]
    return None


# -- the worker's replies -----------------------------------------------------------------


def _text(source: str, reply: dict[str, Any], node: str | None) -> str:
    if "error" in reply:
        raise RenderFailed(source, reply["error"], node=node)
    return str(reply["ok"])


def _value(expression: str, reply: dict[str, Any], node: str | None) -> Any:
    if "error" in reply:
        raise RenderFailed(expression, reply["error"], node=node)
    return reply["ok"]


def _verdict(reply: dict[str, Any]) -> dict[str, Any]:
    if "error" in reply:
        return {"holds": False, "values": {}, "reason": reply["error"]}
    verdict: dict[str, Any] = reply["ok"]
    return verdict


def _settle(
    verdict: dict[str, Any], expression: str, node: str | None, message: str | None
) -> None:
    if verdict["holds"]:
        return
    raise AssertFailed(
        expression, verdict["values"], node=node, reason=verdict["reason"], message=message
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, MemoryError):  # the template worker's limit
        return "SecurityError: the template needs more memory than its sandbox has"
    if isinstance(exc, _CompileFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
