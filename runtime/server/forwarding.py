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
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request, Response
from starlette.background import BackgroundTask

from pcrt.routing.forward import AGENT_HEADER, ForwardedStream, has_text, sse_events
from pcrt.routing.policy import Candidate, Complexity, Route, Work
from pcrt.runtime.errors import InvalidRequest, NoRoute, PeerError, PeerUnavailable
from pcrt.runtime.server.http_errors import CLIENT_CLOSED_REQUEST, status_and_body
from pcrt.runtime.server.owned_stream import OwnedStream
from pcrt.runtime.server.schemas import ChatCompletionRequest, GenerationFields
from pcrt.runtime.server.services import Accounting, Services, services_of
from pcrt.runtime.sse import encode

__all__ = ["ROUTE_HEADER", "forward_if_routed", "route_headers"]

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
) -> Response | None:
    """The peer's answer when the request goes to a peer; None to run it here.

    ``route`` is the OpenAI route the peer is asked on; ``translated``: the OpenAI body of
    a request that came in another API's shape (Ollama's, Anthropic's, Responses'), sent
    instead of the client's own bytes."""
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
    try:
        services.pool.registry.resolve(model)
    except Exception:
        return False
    return True


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
    peer = services.coordinator.peer(candidate.node)
    if peer is None:
        raise PeerUnavailable(f"peer {candidate.node} left the table", peer=candidate.node)
    forwarder = services.coordinator.forwarder
    body = {**raw, "model": candidate.model}
    headers = {"X-PC-Route": "local"}
    agent = request.headers.get(AGENT_HEADER)
    if agent:
        headers[AGENT_HEADER] = agent
    ran_on = route_headers(acct, candidate.node)
    if not stream:
        # the client's own bytes when the model name stands: no second serialization
        same = own_bytes and raw.get("model") == candidate.model
        content = await request.body() if same else json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
        try:
            answer = await forwarder.request(peer, "POST", route, content=content, headers=headers)
        except PeerError as exc:
            if not isinstance(exc, PeerUnavailable):
                status, _, _ = status_and_body(exc)  # the peer's own, for a refusal
                acct.finished_remote(status, None, None, candidate.node)
            raise
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

    async def never_started() -> None:
        """The client left before the first chunk: the peer's stream is closed (so it
        stops generating) and the request billed as one the client cut short."""
        if not opened.closed:
            await opened.aclose()
            acct.finished_remote(CLIENT_CLOSED_REQUEST, None, ttft, candidate.node)

    return OwnedStream(
        _pass_through(opened, wants_usage, acct, ttft, candidate.node),
        release=never_started,
        media_type=opened.media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ran_on},
    )


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
