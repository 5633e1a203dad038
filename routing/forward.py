"""Sending work to a peer over HTTP: one shared connection pool, explicit timeouts.

A pcrt peer is asked with the cluster signature (``auth.py``); an OpenAI-compatible peer
with its own bearer key, read from the env var its config or announcement names.

Failures map onto a small tree (``runtime.errors``): ``PeerUnavailable`` when the peer did
not answer, timed out or failed on its side (the caller may try the next candidate), and
``PeerRejected`` when it refused the request itself (a 4xx; its error body passes through
to our client, since another peer would refuse it too).

A pcrt peer's answer that carries results is taken only with its cluster proof
(``proven=True``): an answer without one (a pcrt of an older version) or with one that does
not verify (changed on the way, or another key) is ``PeerUnavailable``, as a failed peer's.

A stream is opened up to its first body chunk before the caller commits to it, so a peer
that dies between its headers and its first token still counts as "failed before the first
token" and the next candidate can take the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import aiohttp

from pcrt.routing.auth import CLUSTER_HEADER, PROOF_HEADER, request_header, verify_proof
from pcrt.routing.peers import Peer
from pcrt.runtime.errors import Overloaded, PeerRejected, PeerUnavailable
from pcrt.runtime.sse import aevents
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["AGENT_HEADER", "ForwardedStream", "Forwarder", "PeerAnswer", "has_text", "sse_events"]

T = TypeVar("T")

# who a request works for: usage rows and rate limits are per agent, on every node
AGENT_HEADER = "X-PC-Agent-ID"
_LARGE_BODY = 1 << 20  # aiohttp warns from 1 MiB sent as one bytes object

_FINISHED = re.compile(rb'"finish_reason":\s*"')
# what a call can fail with short of an answer (aiohttp wraps the OS's errors)
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def timed_out(exc: BaseException) -> bool:
    """Did the peer fail by being slow (forgiven twice by health checks) rather than by
    refusing or dropping the connection? aiohttp's timeouts subclass TimeoutError."""
    return isinstance(exc, asyncio.TimeoutError)


@dataclass
class PeerAnswer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    sent_cluster_header: str | None
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


class ForwardedStream:
    """An open streamed answer whose first chunk has already arrived."""

    def __init__(
        self, response: aiohttp.ClientResponse, first: bytes, chunks: AsyncIterator[bytes]
    ) -> None:
        self.response = response
        self._first = first
        self._chunks = chunks

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def media_type(self) -> str:
        return self.response.headers.get("content-type", "text/event-stream")

    @property
    def closed(self) -> bool:
        return self.response.closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._first:
                yield self._first
            async for chunk in self._chunks:
                yield chunk
        finally:
            self.aclose_now()

    async def aclose(self) -> None:
        self.aclose_now()

    def aclose_now(self) -> None:
        # a stream left before its end closes its connection: the peer sees the client
        # gone and stops generating; a finished one goes back to the pool
        self.response.release()


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
        self.timeout = self.timeout_reading(read_timeout, connect_timeout)
        self._max_connections = max_connections
        # one aiohttp session (its C HTTP parser and connection pool) for every call, made
        # on first use inside the running loop: httpx's pure-Python stack took 1.70 ms a
        # small loopback POST where aiohttp takes 0.54, of the 2 ms a forward may add. A
        # LAN peer is never reached through the user's proxy.
        self._session: aiohttp.ClientSession | None = None
        # per peer, set when its health checks declare it lost (see ``until_lost``)
        self._lost: dict[str, asyncio.Event] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def timeout_reading(
        self, seconds: float | None, connect: float | None = None
    ) -> aiohttp.ClientTimeout:
        """The usual timeouts with another read limit (None: none): reading may wait,
        connecting (and waiting for a pooled connection) stays quick."""
        if connect is None:
            connect = self.timeout.sock_connect
        return aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=seconds
        )

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
        if not task.cancelled():
            task.exception()  # it failed as it was cancelled: seen, not "never retrieved"
        raise PeerUnavailable(
            f"peer {peer.name} stopped answering its health checks; its work moves on",
            peer=peer.name,
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | BinaryIO | None,
        headers: dict[str, str],
        timeout: float | aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """One request on the shared session; the answer's body is read by the caller.
        A number is one deadline for the whole call (a health check's)."""
        if timeout is None:
            timeout = self.timeout
        elif not isinstance(timeout, aiohttp.ClientTimeout):
            timeout = aiohttp.ClientTimeout(total=timeout)
        if self._session is None:
            # idle connections close before uvicorn's 5 s keep-alive does: a POST is not
            # retried by aiohttp, so one sent on a connection the peer is closing would fail
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, keepalive_timeout=4.0
            )
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, trace_configs=[_pool_waits()]
            )
        # tens of MB (a KV state) go out in chunks, not as one write that holds the loop
        data: bytes | BinaryIO | None = content
        if isinstance(content, bytes) and len(content) > _LARGE_BODY:
            data = io.BytesIO(content)
        waiting = SimpleNamespace(queued=False)
        try:
            return await self._session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                trace_request_ctx=waiting,
            )
        except TimeoutError:
            if waiting.queued:
                # aiohttp counts the wait for a pooled connection in the connect timeout:
                # our own limit was hit, which says nothing about the peer
                raise Overloaded(
                    f"all {self._max_connections} connections to peers are in use; "
                    "try again shortly",
                    retry_after=1.0,
                ) from None
            raise

    def headers_for(
        self,
        peer: Peer,
        method: str,
        path: str,
        body: bytes = b"",
        body_sha256: str | None = None,
    ) -> dict[str, str]:
        headers = {"X-PC-Forwarded-By": self.node_id or "pcrt"}
        if peer.kind == "pcrt":
            if self.cluster_key:
                authority = urlsplit(peer.url).netloc
                headers[CLUSTER_HEADER] = request_header(
                    self.cluster_key,
                    method,
                    path,
                    authority=authority,
                    body=body,
                    body_sha256=body_sha256,
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
        content: bytes | Path | None = None,
        content_sha256: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | aiohttp.ClientTimeout | None = None,
        max_bytes: int | None = None,
        proven: bool = False,
    ) -> PeerAnswer:
        """One whole request; 5xx and transport errors raise PeerUnavailable, 4xx
        PeerRejected, so a returned answer is always a success. ``max_bytes`` bounds the
        answer (a peer's health answer must not fill our memory). A ``Path`` as content
        streams the file from disk; ``content_sha256``, its known hash, is what the
        signature covers (FileNotFoundError if it is gone). ``proven``: the answer must
        carry the peer's cluster proof for this request and these bytes (a pcrt peer's
        results), else PeerUnavailable."""
        if json_body is not None:  # serialized here: the signature covers these bytes
            content = json.dumps(json_body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        if isinstance(content, Path):
            if content_sha256 is None:
                raise ValueError("a file sent to a peer needs its sha256: the signature covers it")
            signed = self.headers_for(peer, method, path, body_sha256=content_sha256)
        else:
            signed = self.headers_for(peer, method, path, content or b"")
        sent = {**signed, **(headers or {})}
        started = time.perf_counter()
        try:
            # a file stays open until the answer is read: aiohttp may still be sending it
            # when a peer answers early (a refusal before the whole body)
            with contextlib.ExitStack() as opened:
                data = (
                    opened.enter_context(open(content, "rb"))
                    if isinstance(content, Path)
                    else content
                )
                response = await self._send(
                    method, peer.url + path, content=data, headers=sent, timeout=timeout
                )
                try:
                    body = bytearray()
                    async for chunk in response.content.iter_any():
                        body += chunk
                        if max_bytes is not None and len(body) > max_bytes:
                            raise PeerUnavailable(
                                f"peer {peer.name} answered more than {max_bytes} bytes to "
                                f"{method} {path}",
                                peer=peer.name,
                            )
                finally:
                    response.release()
        except TRANSPORT_ERRORS as exc:
            raise PeerUnavailable(
                f"peer {peer.name} ({peer.url}) did not answer {method} {path}: {_describe(exc)}",
                peer=peer.name,
                timed_out=timed_out(exc),
            ) from None
        answer = PeerAnswer(
            response.status,
            response.headers,
            bytes(body),
            sent.get(CLUSTER_HEADER),
            time.perf_counter() - started,
        )
        _raise_for_status(peer, method, path, answer.status, answer.body)
        if proven:
            # the answer's sha256: a migrated run's records may be megabytes
            await to_thread_to_completion(self._check_proof, peer, method, path, answer)
        return answer

    def _check_proof(self, peer: Peer, method: str, path: str, answer: PeerAnswer) -> None:
        """PeerUnavailable unless ``answer`` proves the cluster key over this request's
        nonce and its own bytes: results are trusted only from a member, unchanged."""
        proof = answer.headers.get(PROOF_HEADER)
        where = f"peer {peer.name} answered {method} {path.partition('?')[0]}"
        # it answered (``status``): a caller that resends only lost answers does not resend
        if self.cluster_key is None or answer.sent_cluster_header is None:
            raise PeerUnavailable(
                f"{where}, but this node has no cluster key to check the answer with",
                peer=peer.name,
                status=answer.status,
            )
        if not proof:
            raise PeerUnavailable(
                f"{where} without a cluster proof ({PROOF_HEADER}): a pcrt older than this "
                "one does not sign its answers; upgrade it",
                peer=peer.name,
                status=answer.status,
            )
        if not verify_proof(self.cluster_key, answer.sent_cluster_header, answer.body, proof):
            raise PeerUnavailable(
                f"{where} with a cluster proof that does not verify: the answer changed on "
                "the way, or the peer holds another key; its results are not taken",
                peer=peer.name,
                status=answer.status,
            )

    async def open_stream(
        self, peer: Peer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> ForwardedStream:
        """POST and wait for the first generated text (or the stream's end); any failure up
        to there raises, so the caller may still hand the work to another candidate."""
        content = json.dumps(body).encode()
        sent = {
            "Content-Type": "application/json",
            **self.headers_for(peer, "POST", path, content),
            **(headers or {}),
        }
        try:
            response = await self._send("POST", peer.url + path, content=content, headers=sent)
        except TRANSPORT_ERRORS as exc:
            raise PeerUnavailable(
                f"peer {peer.name} ({peer.url}) did not answer: {_describe(exc)}",
                peer=peer.name,
                timed_out=timed_out(exc),
            ) from None
        try:
            if response.status >= 400:
                _raise_for_status(peer, "POST", path, response.status, await response.read())
            chunks = response.content.iter_any()
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
            response.release()
            raise PeerUnavailable(
                f"peer {peer.name} failed before its first token: {_describe(exc)}",
                peer=peer.name,
                timed_out=timed_out(exc),
            ) from None
        except BaseException:
            response.release()
            raise
        return ForwardedStream(response, first, chunks)


def _pool_waits() -> aiohttp.TraceConfig:
    """Marks a request's ``trace_request_ctx`` while it waits for a pooled connection."""

    async def queued(_session: Any, context: Any, _params: Any) -> None:
        context.trace_request_ctx.queued = True

    async def dequeued(_session: Any, context: Any, _params: Any) -> None:
        context.trace_request_ctx.queued = False

    config = aiohttp.TraceConfig()
    config.on_connection_queued_start.append(queued)
    config.on_connection_queued_end.append(dequeued)
    return config


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc) or 'no detail'}"


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
        raise PeerUnavailable(
            f"{message} (check the key configured for it)", peer=peer.name, status=status
        )
    if status >= 500 or status == 408:
        raise PeerUnavailable(message, peer=peer.name, status=status)
    shaped = parsed if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) else {}
    raise PeerRejected(message, peer=peer.name, status=status, body=shaped)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bytes | None]]:
    """Server-sent events from raw chunks: (the event's raw bytes with its blank line, its
    ``data`` payload or None). The raw bytes pass through as they came, so a forwarded
    stream is unchanged."""
    async for event in aevents(chunks):
        yield event.raw, event.data


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
