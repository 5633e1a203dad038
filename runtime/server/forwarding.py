"""OpenAI requests that run on a peer: the routing decision, fallbacks, the passthrough.

A request is forwarded when the policy says so: a ``model`` only a peer has, or the header
``X-PC-Route: peer`` (``local`` pins it here, ``auto`` is the default). ``X-PC-Complexity:
low|medium|high`` declares the request's complexity as a DAG node does (``high`` tries the
strongest model first). A request that a peer forwarded to us always runs here, so two
daemons never bounce work between them.

Streams pass through chunk by chunk. To account for them, the peer is always asked for
the usage chunk; when our client did not ask for it, that one chunk is dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from starlette.background import BackgroundTask

from pcrt.routing.forward import AGENT_HEADER, ForwardedStream, PeerAnswer, has_text, sse_events
from pcrt.routing.peers import Peer
from pcrt.routing.policy import Candidate, Complexity, Route, Work
from pcrt.runtime.errors import InvalidRequest, NoRoute, PeerError, PeerUnavailable
from pcrt.runtime.server.http_errors import CLIENT_CLOSED_REQUEST, status_and_body
from pcrt.runtime.server.owned_stream import OwnedStream
from pcrt.runtime.server.schemas import ChatCompletionRequest, GenerationFields
from pcrt.runtime.server.services import Accounting, Services, services_of
from pcrt.runtime.sse import SseSplitter, encode

__all__ = [
    "ROUTE_HEADER",
    "NativeAnswer",
    "NativeRequest",
    "NativeStream",
    "forward_if_routed",
    "route_headers",
]

_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class NativeRequest:
    """Another API's request as a pcrt peer is asked it: on its own ``path`` with its own
    ``body`` (a pcrt peer speaks that API too), so it runs and is billed there as it came.
    ``usage_of`` reads OpenAI-style usage (``prompt_tokens``, ``completion_tokens``) out of
    the whole answer or one streamed event, None when it holds none; ``failed`` writes a
    failure mid-stream as that API's stream does; ``lines``: its stream is NDJSON lines
    (Ollama's), else server-sent events."""

    path: str
    body: dict[str, Any]
    stream: bool
    usage_of: Callable[[dict[str, Any]], dict[str, Any] | None]
    failed: Callable[[str], bytes]
    lines: bool = False


class NativeAnswer(Response):
    """A pcrt peer's whole answer in the client's own API: sent as it is."""


class NativeStream(OwnedStream):
    """A pcrt peer's stream in the client's own API: passed through as it is."""


ROUTE_HEADER = "x-pc-route"
COMPLEXITY_HEADER = "x-pc-complexity"
# the header values each hint takes, typed as the policy reads them
_ROUTES: dict[str, Route] = {"local": "local", "peer": "peer", "auto": "auto"}
_COMPLEXITIES: dict[str, Complexity] = {"low": "low", "medium": "medium", "high": "high"}


def _route_hint(request: Request) -> Route:
    hint = request.headers.get(ROUTE_HEADER, "auto").strip().lower()
    if hint in _ROUTES:
        return _ROUTES[hint]
    raise InvalidRequest(f"X-PC-Route must be local, peer or auto (got {hint!r})")


def _complexity(request: Request) -> Complexity | None:
    declared = request.headers.get(COMPLEXITY_HEADER)
    if declared is None:
        return None
    value = declared.strip().lower()
    if value in _COMPLEXITIES:
        return _COMPLEXITIES[value]
    raise InvalidRequest(f"X-PC-Complexity must be low, medium or high (got {declared!r})")


def _work(
    body: GenerationFields,
    raw: dict[str, Any],
    route: Route,
    chat: bool,
    complexity: Complexity | None,
) -> Work:
    text = json.dumps(raw.get("messages") if chat else raw.get("prompt"))
    schema = body.output_schema() if isinstance(body, ChatCompletionRequest) else None
    max_tokens = raw.get("max_completion_tokens") or raw.get("max_tokens")
    return Work(
        model=body.model,
        prompt_tokens=len(text) // 4,  # an estimate: the peer's tokenizer is not here
        max_tokens=int(max_tokens) if isinstance(max_tokens, int) else 256,
        has_schema=schema is not None,
        complexity=complexity,
        route=route,
    )


async def forward_if_routed(
    request: Request,
    body: GenerationFields,
    route: str,
    chat: bool,
    acct: Accounting,
    *,
    translated: dict[str, Any] | None = None,
    native: NativeRequest | None = None,
) -> Response | None:
    """The peer's answer when the request goes to a peer; None to run it here.

    ``route`` is the OpenAI route the peer is asked on; ``translated``: the OpenAI body of
    a request that came in another API's shape (Ollama's, Anthropic's, Responses'), sent
    instead of the client's own bytes to a peer that speaks only OpenAI's; ``native``:
    the same request as a pcrt peer is asked it, in its own API (the answer is then a
    ``NativeAnswer`` or ``NativeStream``, already in the client's shape)."""
    services = services_of(request)
    coordinator = services.coordinator
    hint = _route_hint(request)
    complexity = _complexity(request)  # checked even when the request stays here
    forwarded = getattr(request.state, "peer_verified", False) or request.headers.get(
        "x-pc-forwarded-by"
    )
    if forwarded or hint == "local":
        return None
    if not coordinator.enabled:
        if hint == "peer":
            raise NoRoute("X-PC-Route: peer, but this daemon has no peers (pcrt serve --lan)")
        return None
    raw = translated if translated is not None else await request.json()
    work = _work(body, raw, hint, chat, complexity)
    decision = coordinator.decide(work)
    if decision.chosen is None:
        if hint == "peer" or not _known_locally(services, body.model):
            raise NoRoute(decision.reason)
        return None  # the local path gives the precise error (context, ...)
    if decision.is_local:
        return None
    acct.admit(work.prompt_tokens)  # the agent's limits hold wherever the work runs
    for candidate in decision.candidates:
        if candidate.kind == "local":
            return None  # every peer before it failed: local is the last resort
        try:
            if native is not None and candidate.kind == "pcrt":
                return await _forward_native(services, request, native, candidate, acct)
            return await _forward(
                services, request, raw, route, candidate, acct, body.stream, translated is None
            )
        except PeerUnavailable as exc:
            coordinator.report_failure(exc)
            acct.fell_back(candidate.node, str(exc))  # in the usage row and the metrics
    failures = "; ".join(f["error"] for f in acct.fallbacks)
    raise PeerUnavailable(failures or decision.reason, peer="")


def route_headers(acct: Accounting, ran_on: str) -> dict[str, str]:
    """Where the request ran, and which peers failed it first (when any did)."""
    headers = {"X-PC-Ran-On": ran_on}
    if acct.fallbacks:
        headers["X-PC-Fallbacks"] = ", ".join(f["node"] for f in acct.fallbacks)
    return headers


def _known_locally(services: Services, model: str | None) -> bool:
    """Whether this daemon's registry names ``model`` (no model: its default)."""
    return model is None or services.pool.registry.knows(model)


async def _forward(
    services: Services,
    request: Request,
    raw: dict[str, Any],
    route: str,
    candidate: Candidate,
    acct: Accounting,
    stream: bool,
    own_bytes: bool,
) -> Response:
    peer, headers = _peer_of(services, request, candidate)
    forwarder = services.coordinator.forwarder
    body = {**raw, "model": candidate.model}
    ran_on = route_headers(acct, candidate.node)
    if not stream:
        # the client's own bytes when the model name stands: no second serialization
        same = own_bytes and raw.get("model") == candidate.model
        content = await request.body() if same else json.dumps(body).encode()
        answer = await _asked(services, peer, route, content, headers, acct, candidate.node)
        # the usage row is written after the answer has gone out: not on its latency. On
        # the loop (a coroutine), as local requests write theirs: a thread pool hop costs
        # more than the row
        usage = _usage_of(answer.body)

        async def account() -> None:
            acct.finished_remote(200, usage, None, candidate.node)

        task = BackgroundTask(account)
        return Response(answer.body, media_type="application/json", headers=ran_on, background=task)
    wants_usage = bool((raw.get("stream_options") or {}).get("include_usage"))
    body["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
    started = time.perf_counter()
    opened = await forwarder.open_stream(peer, route, body, headers)
    ttft = time.perf_counter() - started

    return OwnedStream(
        _pass_through(opened, wants_usage, acct, ttft, candidate.node),
        release=_never_started(opened, acct, ttft, candidate.node),
        media_type=opened.media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ran_on},
    )


def _never_started(
    opened: ForwardedStream, acct: Accounting, ttft: float, node: str
) -> Callable[[], Awaitable[None]]:
    """What a stream does when its client left before the first chunk: the peer's stream
    is closed (so it stops generating) and the request billed as one the client cut
    short."""

    async def release() -> None:
        if not opened.closed:
            await opened.aclose()
            acct.finished_remote(CLIENT_CLOSED_REQUEST, None, ttft, node)

    return release


def _peer_of(
    services: Services, request: Request, candidate: Candidate
) -> tuple[Peer, dict[str, str]]:
    """The candidate's peer and the headers it is asked with (it runs the request itself:
    never forwards it again; the agent goes along)."""
    peer = services.coordinator.peer(candidate.node)
    if peer is None:
        raise PeerUnavailable(f"peer {candidate.node} left the table", peer=candidate.node)
    headers = {"X-PC-Route": "local"}
    agent = request.headers.get(AGENT_HEADER)
    if agent:
        headers[AGENT_HEADER] = agent
    return peer, headers


async def _asked(
    services: Services,
    peer: Peer,
    path: str,
    content: bytes,
    headers: dict[str, str],
    acct: Accounting,
    node: str,
) -> PeerAnswer:
    """A peer's whole answer; its refusal is billed as its status and raised."""
    try:
        return await services.coordinator.forwarder.request(
            peer, "POST", path, content=content, headers={**headers, **_JSON}
        )
    except PeerError as exc:
        if not isinstance(exc, PeerUnavailable):
            status, _, _ = status_and_body(exc)  # the peer's own, for a refusal
            acct.finished_remote(status, None, None, node)
        raise


async def _forward_native(
    services: Services,
    request: Request,
    native: NativeRequest,
    candidate: Candidate,
    acct: Accounting,
) -> Response:
    """Another API's request on a pcrt peer, in that API: its answer passes through."""
    peer, headers = _peer_of(services, request, candidate)
    body = {**native.body, "model": candidate.model}
    ran_on = route_headers(acct, candidate.node)
    if not native.stream:
        content = json.dumps(body).encode()
        answer = await _asked(services, peer, native.path, content, headers, acct, candidate.node)
        usage = _read_usage(native, answer.body)

        async def account() -> None:
            acct.finished_remote(200, usage, None, candidate.node)

        return NativeAnswer(
            answer.body,
            media_type="application/json",
            headers=ran_on,
            background=BackgroundTask(account),
        )
    started = time.perf_counter()
    opened = await services.coordinator.forwarder.open_stream(peer, native.path, body, headers)
    ttft = time.perf_counter() - started

    return NativeStream(
        _pass_native(opened, native, acct, ttft, candidate.node),
        release=_never_started(opened, acct, ttft, candidate.node),
        media_type=opened.media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ran_on},
    )


async def _pass_native(
    stream: ForwardedStream, native: NativeRequest, acct: Accounting, ttft: float, ran_on: str
) -> AsyncGenerator[bytes, None]:
    """A pcrt peer's stream in the client's API, byte for byte; its usage is read from the
    events as they pass (Ollama's lines, or server-sent events)."""
    usage: dict[str, Any] | None = None
    status = CLIENT_CLOSED_REQUEST  # until the peer's stream ends, the client is the one who left
    reader = _EventReader(native.lines)
    try:
        async for raw in stream:
            yield raw
            for event in reader.feed(raw):
                usage = native.usage_of(event) or usage
        status = 200
    except Exception as exc:
        # the peer broke mid-stream, after our client had bytes: end in the API's own way
        status = 502
        yield native.failed(f"peer {ran_on} failed mid-stream: {type(exc).__name__}")
    finally:
        await stream.aclose()
        acct.finished_remote(status, usage, ttft, ran_on)


class _EventReader:
    """JSON events out of a byte stream: NDJSON lines, or server-sent events' data."""

    def __init__(self, lines: bool) -> None:
        self._lines = lines
        self._buffer = b""
        self._sse = SseSplitter()

    def feed(self, raw: bytes) -> list[dict[str, Any]]:
        if self._lines:
            self._buffer += raw
            *whole, self._buffer = self._buffer.split(b"\n")
            datas = [line for line in whole if line.strip()]
        else:
            datas = [e.data for e in self._sse.feed(raw) if e.data is not None]
        events = []
        for data in datas:
            try:
                event = json.loads(data)
            except ValueError:
                continue  # not ours to judge: it passed through as it came
            if isinstance(event, dict):
                events.append(event)
        return events


def _read_usage(native: NativeRequest, body: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return native.usage_of(answer) if isinstance(answer, dict) else None


async def _pass_through(
    stream: ForwardedStream, wants_usage: bool, acct: Accounting, ttft: float, ran_on: str
) -> AsyncGenerator[bytes, None]:
    usage: dict[str, Any] | None = None
    pieces = 0  # for peers that send no usage chunk (llama-cpp-python's server)
    status = CLIENT_CLOSED_REQUEST  # until the peer's stream ends, the client is the one who left
    try:
        async for raw, data in sse_events(aiter(stream)):
            if data is not None and has_text(data):
                pieces += 1
            if data is not None and _has_usage(data):
                try:
                    event = json.loads(data)
                except ValueError:
                    event = None  # not ours to judge: it passes through as it came
                if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                    if not event.get("choices") and not wants_usage:
                        continue  # we asked for it, not our client
            if data == b"[DONE]":
                # complete: a client that leaves now (as SDKs do) did not cut it short
                status = 200
            yield raw
        status = 200
    except Exception as exc:
        # the peer broke mid-stream, after our client had bytes: end the stream with an
        # error event in OpenAI's shape rather than a cut connection and a traceback
        message = f"peer {ran_on} failed mid-stream: {type(exc).__name__}"
        status, payload, _ = status_and_body(PeerUnavailable(message, peer=ran_on))
        yield encode(json.dumps(payload)).encode()
    finally:
        await stream.aclose()
        acct.finished_remote(status, usage or {"completion_tokens": pieces}, ttft, ran_on)


def _usage_of(body: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _has_usage(data: bytes) -> bool:
    """Cheap check before parsing: chunks carry ``"usage": null`` until the last one."""
    return b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data
