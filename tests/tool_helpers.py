"""What the tool tests share: the MCP test server over streamable HTTP (a process of its
own on a free loopback port), the server processes a test runs, and one ``[tools]``
config over the test servers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tests.live_server import free_port

__all__ = ["ROOT", "mcp_http_server", "mcp_stdio", "server_processes", "tool_config"]

ROOT = Path(__file__).resolve().parent.parent  # where `python -m tests.…` finds the tests


def mcp_stdio(**options: Any) -> dict[str, Any]:
    """A ``[[tools.mcp]]`` entry running tests/mcp_tool_server.py over stdio."""
    return {
        "command": [sys.executable, "-m", "tests.mcp_tool_server"],
        "cwd": str(ROOT),
        **options,
    }


@contextlib.contextmanager
def mcp_http_server() -> Iterator[str]:
    """The MCP test server over streamable HTTP; yields its URL (``…/mcp``)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.mcp_tool_server", "--http", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def server_processes(marker: str = "tests.mcp_tool_server") -> list[psutil.Process]:
    """This process's children (at any depth) whose command line holds ``marker``."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in child.cmdline()):
                found.append(child)
    return found


def tool_config(http_url: str, mcp_url: str | None = None) -> dict[str, Any]:
    """Every kind of tool over the test servers, and permissions for three agents."""
    mcp: list[dict[str, Any]] = [
        mcp_stdio(name="local", env={"PCRT_TEST_WHO": "pcrt"}, idempotent=["echo"]),
        {"name": "broken", "command": ["pcrt-no-such-command-here"]},
    ]
    if mcp_url is not None:
        mcp.append({"name": "remote", "url": mcp_url, "prefix": "r_", "idempotent": True})
    obj = "object"
    return {
        "python": [
            {"name": "add", "entry_point": "tests.tool_functions:add", "idempotent": True},
            {"name": "greet", "entry_point": "tests.tool_functions:greet"},
            {"name": "slow", "entry_point": "tests.tool_functions:slow", "timeout": 0.5},
            {"name": "boom", "entry_point": "tests.tool_functions:boom"},
            {"name": "not_json", "entry_point": "tests.tool_functions:not_json"},
        ],
        "http": [
            {
                "name": "weather",
                "description": "Current weather for a city",
                "url": f"{http_url}/weather",
                "headers_env": {"Authorization": "PCRT_TEST_WEATHER_TOKEN"},
                "parameters": {
                    "type": obj,
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
                "idempotent": True,
            },
            {
                "name": "search",
                "url": f"{http_url}/search",
                "method": "GET",
                "parameters": {
                    "type": obj,
                    "properties": {
                        "q": {"type": "string"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "exact": {"type": "boolean"},
                    },
                },
            },
            {"name": "page_text", "url": f"{http_url}/text", "method": "GET"},
            {"name": "page_fail", "url": f"{http_url}/fail"},
            {"name": "page_hang", "url": f"{http_url}/hang", "timeout": 0.5},
            {"name": "page_big", "url": f"{http_url}/big", "method": "GET"},
            {"name": "page_big_chunked", "url": f"{http_url}/big-chunked", "method": "GET"},
            {"name": "unreachable", "url": f"http://127.0.0.1:{free_port()}/nothing"},
        ],
        "mcp": mcp,
        "permissions": {
            "default": ["*"],
            "agents": {
                "crawler": ["weather", "search"],
                "coder": ["r_*", "echo"],
                "nobody": [],
            },
        },
    }
