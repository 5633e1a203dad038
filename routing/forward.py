"""Sending work to a peer over HTTP: one shared connection pool, explicit timeouts.

A pcrt peer is asked with the cluster signature (``auth.py``); an OpenAI-compatible peer
with its own bearer key, read from the env var its config or announcement names.

Failures map onto a small tree (``runtime.errors``): ``PeerUnavailable`` when the peer did
not answer, timed out or failed on its side (the caller may try the next candidate), and
``PeerRejected`` when it refused the request itself (a 4xx; its error body passes through
to our client, since another peer would refuse it too).

A stream is opened up to its first body chunk before the caller commits to it, so a peer
that dies between its headers and its first token still counts as "failed before the first
token" and the next candidate can take the work.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from pcrt.routing.auth import CLUSTER_HEADER, request_header
from pcrt.routing.peers import Peer
from pcrt.runtime.errors import PeerRejected, PeerUnavailable, RetryLater

__all__ = ["ForwardedStream", "Forwarder", "PeerAnswer", "has_text", "sse_events"]

T = TypeVar("T")

_FINISHED = re.compile(rb'"finish_reason":\s*"')
# what a transport failure can raise: httpx's tree, plus whatever of aiohttp's (the
# transport under the client) its adapter does not translate
TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, asyncio.TimeoutError)


def timed_out(exc: BaseException) -> bool:
    """Did the peer fail by being slow (forgiven twice by health checks) rather than by
    refusing or dropping the connection? The adapter maps every aiohttp connection error
    onto an httpx timeout, so the original cause decides."""
    cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    if isinstance(cause, aiohttp.ClientError):
        return isinstance(cause, asyncio.TimeoutError)  # aiohttp's timeouts subclass it
    return isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError)


@dataclass
class PeerAnswer:
    status: int
    headers: httpx.Headers
    body: bytes
    sent_cluster_header: str | None
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


class ForwardedStream:
    """An open streamed answer whose first chunk has already arrived."""

    def __init__(self, response: httpx.Response, first: bytes, chunks: AsyncIterator[bytes]):
        self.response = response
        self._first = first
        self._chunks = chunks

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def media_type(self) -> str:
        return self.response.headers.get("content-type", "text/event-stream")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._first:
                yield self._first
            async for chunk in self._chunks:
                yield chunk
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()


class Forwarder:
    def __init__(
        self,
        *,
        cluster_key: str | None,
        connect_timeout: float = 2.0,
        read_timeout: float = 600.0,
        node_id: str = "",
        max_connections: int = 256,
    ) -> None:
        self.cluster_key = cluster_key
        self.node_id = node_id
        # connect fails fast (a dead peer is skipped quickly); reads wait for long generations
        self.timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout,
                                     write=30.0, pool=connect_timeout)  # fmt: skip
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=min(64, max_connections)
        )
        # httpx's requests and responses over aiohttp's C parser and connection pool, with
        # no httpx.AsyncClient around them: httpcore's pure-Python HTTP/1.1 cost ~1.4 ms
        # a request, and the client's cookie, auth and redirect layers (which no peer
        # call uses) another 0.1-0.3 ms, of the 2 ms a forward may add. One transport,
        # shared by every call; a LAN peer is never reached through the user's proxy.
        self._transport = AiohttpTransport(limits=limits, trust_env=False)
        # per peer, set when its health checks declare it lost (see ``until_lost``)
        self._lost: dict[str, asyncio.Event] = {}

    async def close(self) -> None:
        await self._transport.aclose()

    def timeout_reading(self, seconds: float | None) -> httpx.Timeout:
        """The usual timeouts with another read limit (None: none)."""
        t = self.timeout
        return httpx.Timeout(connect=t.connect, read=seconds, write=t.write, pool=t.pool)

    def lost(self, peer_name: str) -> None:
        """The peer stopped answering its health checks: long calls on it give up now."""
        event = self._lost.pop(peer_name, None)
        if event is not None:
            event.set()

    async def until_lost(self, peer: Peer, work: Awaitable[T]) -> T:
        """Await ``work`` (a long call on ``peer``: a whole subgraph, a node's stream)
        unless the peer is declared lost first; then ``work`` is cancelled and
        PeerUnavailable raised. A hung peer sends no reset: without this, its callers
        would wait out their read timeout (minutes) before falling back."""
        lost = self._lost.setdefault(peer.name, asyncio.Event())
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # our caller was cancelled: the call must not outlive it
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})  # let it unwind (closes its connection)
        raise PeerUnavailable(
            f"peer {peer.name} stopped answering its health checks; its work moves on",
            peer=peer.name,
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None,
        headers: dict[str, str],
        timeout: float | httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One streamed request on the shared transport, with explicit timeouts."""
        if timeout is None:
            timeout = self.timeout
        elif not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        request = httpx.Request(method, url, content=content, headers=headers,
                                extensions={"timeout": timeout.as_dict()})  # fmt: skip
        return await self._transport.handle_async_request(request)

    def headers_for(self, peer: Peer, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        headers = {"X-PC-Forwarded-By": self.node_id or "pcrt"}
        if peer.kind == "pcrt":
            if self.cluster_key:
                authority = urlsplit(peer.url).netloc
                headers[CLUSTER_HEADER] = request_header(
                    self.cluster_key, method, path, authority=authority, body=body
                )
        elif peer.api_key_env:
            key = os.environ.get(peer.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        return headers

    async def request(
        self,
        peer: Peer,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_bytes: int | None = None,
    ) -> PeerAnswer:
        """One whole request; 5xx and transport errors raise PeerUnavailable, 4xx
        PeerRejected, so a returned answer is always a success. ``max_bytes`` bounds the
        answer (a peer's health answer must not fill our memory)."""
        if json_body is not None:  # serialized here: the signature covers these bytes
            content = json.dumps(json_body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        sent = {**self.headers_for(peer, method, path, content or b""), **(headers or {})}
        started = time.perf_counter()
        try:
            response = await self._send(method, peer.url + path, content=content,
                                        headers=sent, timeout=timeout)  # fmt: skip
            try:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if max_bytes is not None and len(body) > max_bytes:
                        raise PeerUnavailable(
                            f"peer {peer.name} answered more than {max_bytes} bytes to "
                            f"{method} {path}", peer=peer.name,
                        )  # fmt: skip
            finally:
                await response.aclose()
        except httpx.PoolTimeout:
            raise RetryLater("too many requests to peers at once; try again", 1.0) from None
        except TRANSPORT_ERRORS as exc:
            raise PeerUnavailable(
                f"peer {peer.name} ({peer.url}) did not answer {method} {path}: {_describe(exc)}",
                peer=peer.name,
                timed_out=timed_out(exc),
            ) from None
        answer = PeerAnswer(response.status_code, response.headers, bytes(body),
                            sent.get(CLUSTER_HEADER), time.perf_counter() - started)  # fmt: skip
        _raise_for_status(peer, method, path, answer.status, answer.body)
        return answer

    async def open_stream(
        self, peer: Peer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> ForwardedStream:
        """POST and wait for the first generated text (or the stream's end); any failure up
        to there raises, so the caller may still hand the work to another candidate."""
        content = json.dumps(body).encode()
        sent = {"Content-Type": "application/json",
                **self.headers_for(peer, "POST", path, content), **(headers or {})}  # fmt: skip
        try:
            response = await self._send("POST", peer.url + path, content=content, headers=sent)
        except TRANSPORT_ERRORS as exc:
            raise PeerUnavailable(
                f"peer {peer.name} ({peer.url}) did not answer: {_describe(exc)}",
                peer=peer.name,
                timed_out=timed_out(exc),
            ) from None
        try:
            if response.status_code >= 400:
                await response.aread()
                _raise_for_status(peer, "POST", path, response.status_code, response.content)
            chunks = response.aiter_raw()
            # a server sends its role chunk before prefill: hold the stream until a chunk
            # with text (or its end), so a peer dying during prefill is still a fallback
            first = b""
            async for chunk in chunks:
                first += chunk
                if has_text(first) or b"[DONE]" in first or _FINISHED.search(first):
                    break
                if len(first) > 65536:
                    break
        except TRANSPORT_ERRORS as exc:
            await response.aclose()
            raise PeerUnavailable(
                f"peer {peer.name} failed before its first token: {_describe(exc)}",
                peer=peer.name,
                timed_out=timed_out(exc),
            ) from None
        except BaseException:
            await response.aclose()
            raise
        return ForwardedStream(response, first, chunks)


def _describe(exc: BaseException) -> str:
    """The failure as the user should read it: the original error, not the adapter's
    translation (which calls a refused connection a ConnectTimeout)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    return f"{type(cause).__name__}: {cause or 'no detail'}"


def _raise_for_status(peer: Peer, method: str, path: str, status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    detail = ""
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            detail = str(error.get("message", ""))
        elif "detail" in parsed:
            detail = str(parsed["detail"])
    if not detail:
        detail = body[:200].decode("utf-8", "replace")
    message = f"peer {peer.name} answered {status} to {method} {path}: {detail}"
    if status == 429:  # busy for now, not broken: try the next candidate, no cooldown
        raise PeerUnavailable(message, peer=peer.name, cooldown=False, status=status)
    if status in (401, 403):  # our key for it is wrong: the peer's config, not our client's
        raise PeerUnavailable(f"{message} (check the key configured for it)", peer=peer.name,
                              status=status)  # fmt: skip
    if status >= 500 or status == 408:
        raise PeerUnavailable(message, peer=peer.name, status=status)
    shaped = parsed if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) else {}
    raise PeerRejected(message, peer=peer.name, status=status, body=shaped)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bytes | None]]:
    """Server-sent events from raw chunks: (the event's raw bytes with its blank line, its
    ``data`` payload or None). Events may span chunks; the raw bytes pass through as they
    came, so a forwarded stream is unchanged."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            end, size = _event_end(buffer)
            if end < 0:
                break
            raw, buffer = buffer[: end + size], buffer[end + size :]
            yield raw, _data_of(raw)
    if buffer.strip():
        yield buffer, _data_of(buffer)


def _data_of(raw: bytes) -> bytes | None:
    lines = [line[5:].lstrip() for line in raw.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first event ends: a blank line, in LF or CRLF form (sse-starlette)."""
    ends = [(buffer.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n")]
    found = [(i, n) for i, n in ends if i >= 0]
    return min(found) if found else (-1, 0)


def has_text(data: bytes) -> bool:
    """Whether SSE bytes carry generated text (a non-empty content or text field)."""
    for key in (b'"content":', b'"text":'):
        start = 0
        while (at := data.find(key, start)) >= 0:
            rest = data[at + len(key) :].lstrip()
            if rest and not (rest.startswith(b'""') or rest.startswith(b"null")):
                return True
            start = at + len(key)
    return False
