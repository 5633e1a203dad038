"""The check every request passes before its route runs: who may call (the API key, or a
peer's cluster signature) and whether its JSON body is text at all.

One FastAPI dependency does both (``request_guard``): each dependency costs every request
its resolution.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from fastapi import Request

from pcrt.routing.auth import CLUSTER_HEADER
from pcrt.runtime.errors import InvalidRequest, Unauthorized
from pcrt.runtime.server.services import services_of
from pcrt.runtime.server.uploads import streamed_body_sha256
from pcrt.runtime.textcheck import broken_text_at

__all__ = ["refuse_broken_text", "request_guard", "require_key"]

log = logging.getLogger(__name__)


def request_guard(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """The app's one dependency; ``api_key`` None: no key is asked of local users."""

    async def guard(request: Request) -> None:
        await require_key(request, api_key)
        await refuse_broken_text(request)

    return guard


async def require_key(request: Request, api_key: str | None) -> None:
    """``Unauthorized`` unless the request carries the API key or a valid cluster
    signature. A peer proves the cluster key instead of holding our API key; it is checked
    once here (the nonce is spent) and the routes for peers read the verdict in
    ``request.state.peer_verified``."""
    request.state.peer_verified = False
    signature = request.headers.get(CLUSTER_HEADER)
    if signature is not None:
        coordinator = services_of(request).coordinator
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        declared = streamed_body_sha256(request)
        if declared is not None:  # a blob: the route streams it and checks its hash
            why = coordinator.check_peer_request(
                signature, request.method, target, body_sha256=declared
            )
        else:
            body = await request.body()  # cached: the route reads it again
            why = coordinator.check_peer_request(signature, request.method, target, body)
        if why is not None:
            log.warning("refused a peer request to %s: %s", request.url.path, why)
            raise Unauthorized(f"cluster signature refused: {why}")
        request.state.peer_verified = True
        return
    if api_key is None or request.url.path == "/health":
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), api_key.encode()
    ):
        raise Unauthorized("missing or wrong API key (send Authorization: Bearer KEY)")


async def refuse_broken_text(request: Request) -> None:
    """A JSON body may escape half of a UTF-16 pair ("\\ud800"). Python decodes it to a
    str that is no UTF-8 text: the tokenizer, SQLite and the answer would each fail on it
    later, some after work was done or recorded. It is a 400 before anything runs."""
    if request.method != "POST" or "json" not in request.headers.get("content-type", "").lower():
        return  # uploads (PUT) stream past this unread, whatever they call themselves
    body = await request.body()  # FastAPI has read it already
    if b"\\ud" not in body and b"\\uD" not in body:
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # FastAPI answers malformed JSON itself
    where = broken_text_at(data)
    if where is not None:
        raise InvalidRequest(
            f"{where} holds an unpaired UTF-16 surrogate escape (like \\ud800): not text"
        )
