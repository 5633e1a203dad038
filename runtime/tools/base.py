"""What every kind of tool shares: a tool as the registry lists it, the result of one
call, a problem met while starting, and the backend protocol each kind implements.

A tool's own failure (an HTTP 500, an MCP ``is_error``, a Python exception, a refused
connection) is a ``ToolResult`` with ``ok`` False, not an exception: the model that
called the tool reads the error and may try again. Only the caller's mistakes raise
(an unknown tool, a denied one, bad arguments), from the registry, before anything is
sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "Backend",
    "Kind",
    "Outcome",
    "Tool",
    "ToolProblem",
    "ToolResult",
    "clip",
    "failure",
    "json_text",
]

Kind = Literal["http", "mcp", "python"]
Outcome = Literal["ok", "error", "timeout", "denied", "invalid"]
"""How a call to a known tool ended: it answered (ok), it failed (error), it did not
answer in time (timeout); or it was refused before anything was sent: the agent may not
call it (denied), its arguments do not fit its schema (invalid)."""


@dataclass(frozen=True)
class Tool:
    """One callable tool. ``source`` says where it lives (the MCP server's name, the HTTP
    URL's host, the entry point) and never holds a secret; ``parameters`` is the JSON
    schema of its arguments (an object schema; not to be mutated); ``timeout`` is what a
    call waits at most, in seconds, unless the caller asks for another bound."""

    name: str
    description: str
    parameters: dict[str, Any] = field(hash=False)
    kind: Kind
    source: str
    idempotent: bool
    timeout: float

    def describe(self) -> dict[str, Any]:
        """Its JSON view (``GET /v1/pcrt/tools``, ``pcrt tools list``)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "kind": self.kind,
            "source": self.source,
            "idempotent": self.idempotent,
            "timeout": self.timeout,
        }


@dataclass(frozen=True)
class ToolResult:
    """What one call gave back. ``text`` is what the model reads (the error's text when
    ``ok`` is False); ``value`` the parsed JSON when the tool answered JSON (an MCP
    tool's structured content), else None; ``seconds`` the call's wall time."""

    ok: bool
    text: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "text": self.text,
            "value": self.value,
            "error": self.error,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class ToolProblem:
    """Something the registry could not offer: an MCP server that did not start or list
    (``tool`` None), or one tool it skipped (a name or schema it cannot take)."""

    kind: Kind
    source: str
    error: str
    tool: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "tool": self.tool, "error": self.error}


class Backend(Protocol):
    """One kind's tools, started and closed by the registry (an async context manager).

    ``call`` gets arguments already checked against the tool's schema, returns a
    ``ToolResult`` for anything the tool did (``seconds`` is filled in by the registry),
    and raises ``TimeoutError`` when the tool did not answer within ``timeout``: the
    registry also bounds the whole call by it, so a backend's own bound is a courtesy to
    the tool (a timeout it sends, a cancellation the server hears)."""

    tools: list[Tool]
    problems: list[ToolProblem]

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def call(self, tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolResult: ...


def failure(message: str) -> ToolResult:
    """A call the tool failed: the model reads ``message``."""
    return ToolResult(ok=False, text=message, error=message)


def json_text(value: Any) -> str | None:
    """``value`` as JSON text, or None when it is not JSON (a set, an object, NaN)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def clip(text: str, limit: int = 500) -> str:
    """A long error body shortened for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
