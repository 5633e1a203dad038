"""The tool registry: every configured tool, who may call it, and one way to call any.

``ToolRegistry`` is an async context manager: entering it imports the Python tools,
opens the HTTP client and starts every MCP server (together, each bounded by its
``connect_timeout``); leaving it closes every session and stops every server process.
What could not start is in ``problems``, never an exception: a daemon with a broken
MCP server still serves, without that server's tools.

A call goes: the tool by name (``ToolNotFound``), the agent's permission
(``ToolDenied``), its arguments against the tool's schema (``InvalidRequest`` naming the
path), all before anything is sent; then the tool, bounded by its timeout (or the
caller's): what the tool does, failures included, comes back as a ``ToolResult``. The
DAG executor uses ``tools``, ``get``, ``allowed`` and ``call``, and records a call
before it sends it (``Tool.idempotent`` says whether a crash may send it again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from pcrt.runtime.errors import ToolDenied, ToolNotFound
from pcrt.runtime.tools.arguments import ArgumentCheck
from pcrt.runtime.tools.base import Backend, Outcome, Tool, ToolProblem, ToolResult
from pcrt.runtime.tools.permissions import Permissions
from pcrt.runtime.tools.settings import ToolSettings

__all__ = ["CallObserver", "ToolRegistry"]

log = logging.getLogger(__name__)

CallObserver = Callable[[str, Outcome, float, str | None], object]
"""Told of every call to a known tool: its name, outcome, seconds and the calling agent
(None: the daemon's own code)."""
"""Told of every call that reached a known tool: its name, outcome, seconds (metrics)."""


class ToolRegistry:
    """``async with ToolRegistry(settings, on_call=...) as tools:``; ``clock`` is what
    calls are timed by (tests may pass their own)."""

    def __init__(
        self,
        settings: ToolSettings,
        *,
        on_call: CallObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings
        self.permissions = Permissions(settings.permissions)
        self.problems: list[ToolProblem] = []
        self._on_call = on_call
        self._clock = clock
        self._tools: dict[str, Tool] = {}
        self._backends: dict[str, Backend] = {}
        self._checks: dict[str, ArgumentCheck] = {}
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> ToolRegistry:
        if self._stack is not None:
            raise RuntimeError("a ToolRegistry is entered once")
        self._stack = AsyncExitStack()
        try:
            for backend in self._backends_of(self.settings):
                await self._stack.enter_async_context(backend)
                self.problems.extend(backend.problems)
                for tool in backend.tools:
                    self._add(tool, backend)
        except BaseException:
            await self._stack.aclose()
            raise
        if self._tools or self.problems:
            log.info(
                "tools: %d ready%s",
                len(self._tools),
                f", {len(self.problems)} problem(s)" if self.problems else "",
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        self._tools.clear()
        self._backends.clear()
        if stack is not None:
            await stack.aclose()

    def tools(self, agent: str | None = None) -> list[Tool]:
        """Every tool, by name; only those ``agent`` may call when one is given."""
        return [
            tool
            for name, tool in sorted(self._tools.items())
            if self.permissions.allowed(agent, name)
        ]

    def get(self, name: str) -> Tool:
        tool = self._tools.get(name)
        if tool is None:
            hint = " (some tools are unavailable: see the registry's problems)"
            raise ToolNotFound(name, hint if self.problems else "")
        return tool

    def allowed(self, agent: str | None, name: str) -> bool:
        """Whether ``agent`` may call ``name`` (None: the daemon itself, unchecked)."""
        return self.permissions.allowed(agent, name)

    def agents_for(self, name: str) -> list[str]:
        """The agents the config lets call ``name``; ``"*"``: every agent not named."""
        return self.permissions.agents_for(name)

    def describe(self, agent: str) -> dict[str, Any]:
        """Every tool and problem as JSON (``GET /v1/pcrt/tools``, ``pcrt tools list``):
        ``allowed`` for ``agent``, ``agents`` all that may. No secret is in it: no
        header or environment value, no URL path."""
        return {
            "agent": agent,
            "tools": [
                {
                    **tool.describe(),
                    "allowed": self.allowed(agent, tool.name),
                    "agents": self.agents_for(tool.name),
                }
                for tool in self.tools()
            ],
            "problems": [problem.to_dict() for problem in self.problems],
        }

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> ToolResult:
        """Call tool ``name``. Raises only for the caller's mistakes, before anything is
        sent; a tool that fails or does not answer within ``timeout`` (default: its
        own) is a ``ToolResult`` with ``ok`` False."""
        tool = self.get(name)
        if not self.allowed(agent, name):
            assert agent is not None  # no agent is never denied
            self._observe(name, "denied", 0.0, agent)
            raise ToolDenied(name, agent)
        try:
            await self._checks[name].check(arguments)
        except Exception:
            self._observe(name, "invalid", 0.0, agent)
            raise
        limit = tool.timeout if timeout is None else timeout
        started = self._clock()
        outcome: Outcome
        try:
            async with asyncio.timeout(limit):
                result = await self._backends[name].call(tool, arguments, limit)
            outcome = "ok" if result.ok else "error"
        except TimeoutError:
            message = f"tool {name!r} timed out after {limit:g} s"
            result = ToolResult(ok=False, text=message, error=message)
            outcome = "timeout"
        seconds = self._clock() - started
        self._observe(name, outcome, seconds, agent)
        return ToolResult(result.ok, result.text, result.value, result.error, seconds)

    def _add(self, tool: Tool, backend: Backend) -> None:
        if tool.name in self._tools:
            other = self._tools[tool.name]
            self.problems.append(
                ToolProblem(
                    tool.kind,
                    tool.source,
                    f"the name is taken by a {other.kind} tool from {other.source}",
                    tool.name,
                )
            )
            return
        self._tools[tool.name] = tool
        self._backends[tool.name] = backend
        self._checks[tool.name] = ArgumentCheck(tool.name, tool.parameters)

    def _observe(self, name: str, outcome: Outcome, seconds: float, agent: str | None) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(name, outcome, seconds, agent)
        except Exception:  # metrics must never fail the call they count
            log.exception("the tool call observer failed")

    @staticmethod
    def _backends_of(settings: ToolSettings) -> list[Backend]:
        """One backend per kind in use; an empty ``[tools]`` imports no MCP SDK at all."""
        backends: list[Backend] = []
        if settings.python:
            from pcrt.runtime.tools.python_tools import PythonTools

            backends.append(PythonTools(settings.python))
        if settings.http:
            from pcrt.runtime.tools.http_tools import HttpTools

            backends.append(HttpTools(settings.http))
        if settings.mcp:
            from pcrt.runtime.tools.mcp_tools import McpTools

            backends.append(McpTools(settings.mcp))
        return backends
