"""Python callables as tools (``[[tools.python]]``), named ``module:attribute``.

The module is imported when the registry starts; one that does not import, or an
attribute that is not callable, is a problem of the registry, not a daemon that fails
to start. Parameters come from the config, else from the signature (pydantic's schema of
its annotated parameters); the description from the config, else the docstring.

An async callable is awaited on the loop. A sync one runs on a daemon thread of its own,
not through ``pcrt.runtime.threads``: that helper waits for its thread when the caller
is cancelled (right for a store write, which must end before the store closes), and a
tool that hangs must not hang its caller. On a timeout the thread is left to finish on
its own (Python cannot stop a thread) and its result is dropped; being a daemon thread
and in no pool, it neither starves the loop's default executor nor holds up the
daemon's exit. The result must be JSON: a ``str`` is the text itself, anything else is
sent as its JSON text with ``value`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict, create_model

from pcrt.runtime.tools.base import Tool, ToolProblem, ToolResult, failure, json_text
from pcrt.runtime.tools.settings import PythonToolSettings, check_parameters

__all__ = ["PythonTools", "signature_schema"]

log = logging.getLogger(__name__)


class PythonTools:
    def __init__(self, settings: tuple[PythonToolSettings, ...]) -> None:
        self.settings = settings
        self.tools: list[Tool] = []
        self.problems: list[ToolProblem] = []
        self._callables: dict[str, Callable[..., Any]] = {}

    async def __aenter__(self) -> PythonTools:
        for s in self.settings:
            try:
                fn = _load(s.entry_point)
                parameters = s.parameters or signature_schema(fn)
                check_parameters(parameters)
            except Exception as exc:  # a user's module may raise anything while importing
                log.warning("python tool %s (%s) is unavailable: %s", s.name, s.entry_point, exc)
                self.problems.append(ToolProblem("python", s.entry_point, _reason(exc), s.name))
                continue
            self._callables[s.name] = fn
            self.tools.append(
                Tool(
                    name=s.name,
                    description=s.description or _first_paragraph(fn),
                    parameters=parameters,
                    kind="python",
                    source=s.entry_point,
                    idempotent=s.idempotent,
                    timeout=s.timeout,
                )
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._callables.clear()

    async def call(self, tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolResult:
        fn = self._callables[tool.name]
        try:
            if inspect.iscoroutinefunction(fn):
                result = await fn(**arguments)
            else:
                result = await _on_a_thread(fn, arguments, tool.name)
        except (Exception, SystemExit) as exc:  # sys.exit() in a tool ends only the call
            return failure(f"tool {tool.name!r} raised {type(exc).__name__}: {exc}")
        if isinstance(result, str):
            return ToolResult(ok=True, text=result)
        text = json_text(result)
        if text is None:
            return failure(f"tool {tool.name!r} returned a {type(result).__name__}, not JSON")
        return ToolResult(ok=True, text=text, value=result)


def signature_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of ``fn``'s keyword-passable parameters (unannotated: any)."""
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        annotation = Any if p.annotation is p.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
    model = create_model(
        f"{getattr(fn, '__name__', 'tool')}_arguments",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )
    schema: dict[str, Any] = model.model_json_schema()
    schema.pop("title", None)
    return schema


async def _on_a_thread(fn: Callable[..., Any], arguments: dict[str, Any], name: str) -> Any:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # a caller that timed out has cancelled it
            outcome()

    def run() -> None:
        try:
            result = fn(**arguments)
        except BaseException as exc:  # handed to the caller's loop, whatever it is
            # a tool's sys.exit() or KeyboardInterrupt is its failure, not the daemon's
            error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
            _soon(loop, lambda: settle(lambda: done.set_exception(error)))
        else:
            _soon(loop, lambda: settle(lambda: done.set_result(result)))

    threading.Thread(target=run, name=f"pcrt-tool-{name}", daemon=True).start()
    return await done


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    # a loop that closed while the tool ran has nobody waiting for it
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _load(entry_point: str) -> Callable[..., Any]:
    module_name, _, attribute = entry_point.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{entry_point} is a {type(target).__name__}, not a callable")
    return target


def _first_paragraph(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
