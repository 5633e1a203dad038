"""An MCP server for the tool registry's tests, written with the ``mcp`` SDK:
``python -m tests.mcp_tool_server`` serves stdio (other arguments are ignored: a test
marks its own server's command line with one); ``--http PORT`` streamable HTTP on
127.0.0.1 (at /mcp). Its tools: ``add``, ``echo``, ``sleep`` (for timeouts), ``fail``
(raises), ``whoami`` (an environment variable, to see ``env`` reach it), ``nap`` (a
second at most: what a model may be asked to call)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import anyio
from mcp.server.mcpserver import MCPServer
from pydantic import Field

__all__ = ["server"]


def server() -> MCPServer:
    mcp = MCPServer("pcrt-test-tools")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    def echo(text: str) -> str:
        """Say the text back."""
        return text

    @mcp.tool()
    async def sleep(seconds: float) -> str:
        """Sleep, then answer (cancellable: the session goes on)."""
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @mcp.tool()
    async def nap(seconds: Annotated[float, Field(ge=0.5, le=1.0)]) -> str:
        """Sleep half a second to a second, then answer."""
        await anyio.sleep(seconds)
        return f"napped {seconds}"

    @mcp.tool()
    def fail(why: str) -> str:
        """Raise an error."""
        raise RuntimeError(f"failed on purpose: {why}")

    @mcp.tool()
    def whoami() -> str:
        """The PCRT_TEST_WHO environment variable."""
        return os.environ.get("PCRT_TEST_WHO", "nobody")

    return mcp


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server().run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server().run()
