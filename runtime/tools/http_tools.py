"""HTTP endpoints as tools (``[[tools.http]]``): one ``httpx.AsyncClient`` for all of them.

POST sends the arguments as a JSON body; GET as query parameters (a list repeats its
name, an object goes as its JSON text). Header values come from environment variables
read at each call, so a rotated token needs no restart and no value is ever stored.
An answer is read as it streams and refused past ``max_response_bytes``: a tool that
answers 5 GiB costs 1 MiB of memory, not 5 GiB. JSON answers (by Content-Type) are
parsed into ``value``; any 4xx or 5xx is the tool's failure, with the start of its body.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

import httpx

from pcrt.runtime.tools.base import Tool, ToolProblem, ToolResult, clip, failure
from pcrt.runtime.tools.settings import HttpToolSettings

__all__ = ["HttpTools", "query_params"]


class HttpTools:
    def __init__(self, settings: tuple[HttpToolSettings, ...]) -> None:
        self.settings = {s.name: s for s in settings}
        self.tools = [
            Tool(
                name=s.name,
                description=s.description,
                parameters=s.parameters,
                kind="http",
                source=_host(s.url),
                idempotent=s.idempotent,
                timeout=s.timeout,
            )
            for s in settings
        ]
        self.problems: list[ToolProblem] = []
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> HttpTools:
        # redirects are not followed: a tool's URL is where its arguments may go
        self._client = httpx.AsyncClient(follow_redirects=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def call(self, tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolResult:
        assert self._client is not None, "HttpTools is used inside its async with"
        s = self.settings[tool.name]
        headers = {}
        for header, variable in s.headers_env.items():
            value = os.environ.get(variable)
            if value is None:
                return failure(
                    f"tool {tool.name!r} is not configured: environment variable {variable} "
                    f"(header {header}) is not set"
                )
            headers[header] = value
        request = self._client.build_request(
            s.method,
            s.url,
            headers=headers,
            timeout=timeout,
            **({"params": query_params(arguments)} if s.method == "GET" else {"json": arguments}),
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.HTTPError as exc:
            return failure(f"tool {tool.name!r}: cannot reach {_host(s.url)}: {_reason(exc)}")
        try:
            body = await _read_bounded(response, s.max_response_bytes)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.HTTPError as exc:
            return failure(f"tool {tool.name!r}: the answer broke off: {_reason(exc)}")
        finally:
            await response.aclose()
        if body is None:
            return failure(
                f"tool {tool.name!r}: the answer is over {s.max_response_bytes} bytes "
                "(max_response_bytes): not read"
            )
        text = body.decode(response.encoding or "utf-8", errors="replace")
        if response.status_code >= 400:
            return failure(f"tool {tool.name!r}: HTTP {response.status_code}: {clip(text)}")
        value = None
        if _is_json(response.headers.get("content-type", "")):
            try:
                value = json.loads(text)
            except ValueError:
                return failure(f"tool {tool.name!r}: its JSON answer does not parse: {clip(text)}")
        return ToolResult(ok=True, text=text, value=value)


def query_params(arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """Arguments as query parameters: scalars as text (``true``/``false`` for booleans,
    nothing for null), a list as its items repeated, an object as its JSON."""
    params: list[tuple[str, str]] = []
    for name, value in arguments.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            if isinstance(item, bool):
                params.append((name, "true" if item else "false"))
            elif isinstance(item, dict | list):
                params.append((name, json.dumps(item, separators=(",", ":"))))
            else:
                params.append((name, str(item)))
    return params


async def _read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (no more of it is read)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    pieces: list[bytes] = []
    size = 0
    async for piece in response.aiter_bytes():
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
    return b"".join(pieces)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _host(url: str) -> str:
    """Where a URL points, without its path, query or any credentials in it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
