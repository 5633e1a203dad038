"""MCP servers' tools (``[[tools.mcp]]``), through the official ``mcp`` SDK's ``Client``.

Each server's session is held open by a task of its own (``McpServer._hold``), which
enters the SDK's ``Client``, lists the tools, and then waits until the registry closes.
Why a task and not the registry's exit stack: the SDK runs the session in anyio task
groups, which must be left by the task that entered them, and whose failure cancels
that task. Held in a task of its own, a server that dies takes down its own task, never
the daemon's lifespan, and the registry may be entered and left by different tasks.
Calls are made from the callers' tasks on that open session (JSON-RPC multiplexes
them): a timeout is the SDK's ``read_timeout_seconds`` (its MCPError -32001 is a
``TimeoutError`` here), and a caller cancelled first (the registry's own bound) makes
the SDK send the server ``notifications/cancelled``; either way the request leaves the
session and the next call goes through.

Starting is bounded by ``connect_timeout``: a server that does not answer by then is
cancelled (the SDK closes its stdin, then kills its process group) and listed as a
problem, with the last lines it wrote to stderr. Closing asks each task to leave its
``Client``, which stops the server the same way; a task that does not end in time is
cancelled. No server process outlives the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from contextlib import AsyncExitStack
from typing import Any, TextIO

from pcrt.runtime.tools.base import Tool, ToolProblem, ToolResult, failure
from pcrt.runtime.tools.settings import NAME_PATTERN, McpServerSettings, check_parameters

__all__ = ["McpServer", "McpTools"]

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 10.0  # the SDK's own stop escalates within ~6 s (stdin, SIGTERM, SIGKILL)
_LIST_PAGES = 100  # a server whose listing never ends cannot hang the start
_STDERR_LINES = 20


class McpTools:
    """Every configured MCP server, started together (the start takes the slowest one's
    time, not their sum) and closed together."""

    def __init__(self, settings: tuple[McpServerSettings, ...]) -> None:
        self.servers = [McpServer(s) for s in settings]
        self.tools: list[Tool] = []
        self.problems: list[ToolProblem] = []
        self._by_tool: dict[str, McpServer] = {}

    async def __aenter__(self) -> McpTools:
        try:
            await asyncio.gather(*(server.start() for server in self.servers))
        except BaseException:
            await self.__aexit__()
            raise
        for server in self.servers:
            self.problems.extend(server.problems)
            for tool in server.tools:
                self.tools.append(tool)
                self._by_tool[tool.name] = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(server.close() for server in self.servers))

    async def call(self, tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolResult:
        return await self._by_tool[tool.name].call(tool, arguments, timeout)


class McpServer:
    """One MCP server: its session, held by a task of its own, and its tools."""

    def __init__(self, settings: McpServerSettings) -> None:
        self.settings = settings
        self.tools: list[Tool] = []
        self.problems: list[ToolProblem] = []
        self.client: Any = None  # the SDK's Client while the session is open
        self._names: dict[str, str] = {}  # our tool name -> the server's
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stderr = _StderrTail(settings.name)

    @property
    def name(self) -> str:
        return self.settings.name

    async def start(self) -> None:
        """Connected and listed, or a problem recorded; never raises for the server's
        own failure."""
        self._task = asyncio.create_task(self._hold(), name=f"pcrt-mcp-{self.name}")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, self._task},
                timeout=self.settings.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
        if not done:
            # cancelled, not awaited: the SDK's stop of a process that ignores its closed
            # stdin takes seconds, which the daemon's start should not wait for (close does)
            self._task.cancel()
            self._problem(f"did not start within {self.settings.connect_timeout:g} s")

    async def close(self) -> None:
        self._closing.set()
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT)
        if not done:
            log.warning("MCP server %s did not stop within %g s", self.name, _CLOSE_TIMEOUT)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def call(self, tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolResult:
        from mcp import MCPError
        from mcp_types import REQUEST_TIMEOUT

        client = self.client
        if client is None:
            return failure(f"tool {tool.name!r}: MCP server {self.name!r} is not connected")
        try:
            result = await client.call_tool(
                self._names[tool.name], arguments, read_timeout_seconds=timeout
            )
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise TimeoutError from None
            return failure(f"tool {tool.name!r}: MCP server {self.name!r}: {exc}")
        except Exception as exc:  # the session broke: a dead server, a closed stream
            return failure(f"tool {tool.name!r}: MCP server {self.name!r}: {_reason(exc)}")
        return _result(result)

    async def _hold(self) -> None:
        """The session's life: connect, list, wait for close, leave (stopping the server)."""
        from mcp import Client

        try:
            async with AsyncExitStack() as stack:
                transport = await self._transport(stack)
                client = Client(
                    transport,
                    read_timeout_seconds=self.settings.connect_timeout,
                    cache=None,  # the tools are listed once; nothing to serve from a cache
                )
                try:
                    await stack.enter_async_context(client)
                finally:
                    self._stderr.spawned()  # our copy of its stderr pipe goes: EOF at its exit
                self._accept(await _list_tools(client))
                self.client = client
                self._ready.set()
                await self._closing.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closing.is_set():
                log.info("MCP server %s closed with an error: %s", self.name, _reason(exc))
                return
            tail = await self._stderr.tail()
            self._problem(_reason(exc) + (f" (stderr: {tail})" if tail else ""))
        finally:
            self.client = None
            self._stderr.close()

    async def _transport(self, stack: AsyncExitStack) -> Any:
        """The SDK transport for this server: a stdio process or a streamable-HTTP URL."""
        s = self.settings
        if s.command is not None:
            from mcp import StdioServerParameters, stdio_client

            params = StdioServerParameters(
                command=s.command[0], args=s.command[1:], env=s.env or None, cwd=s.cwd
            )
            return stdio_client(params, errlog=await self._stderr.open())
        assert s.url is not None
        from mcp.client.streamable_http import streamable_http_client

        if not s.headers_env:
            return streamable_http_client(s.url)
        import httpx2

        headers = {}
        for header, variable in s.headers_env.items():
            value = os.environ.get(variable)
            if value is None:
                raise RuntimeError(f"environment variable {variable} (header {header}) is not set")
            headers[header] = value
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=headers))
        return streamable_http_client(s.url, http_client=http)

    def _accept(self, listed: list[Any]) -> None:
        import re

        for item in listed:
            name = self.settings.prefix + item.name
            if not re.match(NAME_PATTERN, name):
                self._problem(f"tool name {name!r} does not match {NAME_PATTERN}", tool=name)
                continue
            try:
                parameters = check_parameters(item.input_schema)
            except ValueError as exc:
                self._problem(f"its input schema: {exc}", tool=name)
                continue
            self._names[name] = item.name
            self.tools.append(
                Tool(
                    name=name,
                    description=item.description or "",
                    parameters=parameters,
                    kind="mcp",
                    source=self.name,
                    idempotent=self.settings.is_idempotent(item.name),
                    timeout=self.settings.timeout,
                )
            )

    def _problem(self, error: str, tool: str | None = None) -> None:
        what = f"tool {tool} of MCP server {self.name}" if tool else f"MCP server {self.name}"
        log.warning("%s is unavailable: %s", what, error)
        self.problems.append(ToolProblem("mcp", self.name, error, tool))


async def _list_tools(client: Any) -> list[Any]:
    tools: list[Any] = []
    cursor = None
    for _ in range(_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _result(result: Any) -> ToolResult:
    """An MCP CallToolResult as ours: its text blocks joined, others named by type."""
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        if isinstance(text, str):
            parts.append(text)
        else:
            mime = getattr(block, "mime_type", None)
            parts.append(f"[{block.type}{f' {mime}' if mime else ''}]")
    text = "\n".join(parts)
    value = result.structured_content
    if result.is_error:
        error = text or "the tool reported an error"
        return ToolResult(ok=False, text=error, value=value, error=error)
    return ToolResult(ok=True, text=text, value=value)


class _StderrTail:
    """What a stdio server writes to stderr: logged (debug), its last lines kept for the
    problem that names why it did not start. A pipe, not a file: a chatty server fills
    no disk, and its lines arrive as it writes them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: deque[str] = deque(maxlen=_STDERR_LINES)
        self._writer: TextIO | None = None
        self._reader: asyncio.ReadTransport | None = None
        self._ended = asyncio.Event()
        self._partial = b""

    async def open(self) -> TextIO:
        """The write end, for the server's stderr (read from the loop as it arrives)."""
        read_fd, write_fd = os.pipe()
        self._writer = os.fdopen(write_fd, "w")
        reader = os.fdopen(read_fd, "rb", buffering=0)
        loop = asyncio.get_running_loop()
        self._reader, _ = await loop.connect_read_pipe(lambda: _TailProtocol(self), reader)
        return self._writer

    def spawned(self) -> None:
        """The process has its own copy of the write end now (or never will)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def receive(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        self._partial = self._partial[-4096:]
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                log.debug("MCP server %s: %s", self.name, line)
                self.lines.append(line[:500])

    def ended(self) -> None:
        self.receive(b"\n")
        self._ended.set()

    async def tail(self, lines: int = 3) -> str:
        """Its last lines, once it stopped writing (a second at most)."""
        self.spawned()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), 1.0)
        return " | ".join(list(self.lines)[-lines:])

    def close(self) -> None:
        self.spawned()
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _TailProtocol(asyncio.Protocol):
    def __init__(self, tail: _StderrTail) -> None:
        self.tail = tail

    def data_received(self, data: bytes) -> None:
        self.tail.receive(data)

    def eof_received(self) -> bool | None:
        self.tail.ended()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.tail.ended()


def _reason(exc: BaseException) -> str:
    """The innermost error of an exception group (the SDK's task groups wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
