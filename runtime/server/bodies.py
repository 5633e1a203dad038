"""How many bytes each route's request body may hold, and reading a body under that bound.

The guard (``guard.py``) reads a request's body before any route sees it, and only after
the request proved who sent it: a chat or text completion of ``max_body_bytes`` at most,
embeddings ``embeddings_max_body_bytes``, a DAG ``dag_max_body_bytes``, what a peer sends
(subgraphs, migrated runs) ``peer_max_body_bytes``; every other route takes a few fields
(``SMALL_BODY_BYTES``). A Content-Length over the bound is refused before a byte is read;
a chunked body when it passes the bound, and nothing more of it is read.

KV state uploads stream to disk under their own bound (``state_upload_max_bytes``,
``uploads.py``): the guard leaves their bodies to the route, unread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.types import Message, Receive

from pcrt.routing.migrate import BLOBS_PATH, CHUNKS_PATH, MISSING_CHUNKS_PATH, RUNS_PATH
from pcrt.routing.remote import SUBGRAPH_PATH
from pcrt.runtime.errors import RequestTooLarge
from pcrt.runtime.server.settings import ServerSettings

__all__ = [
    "SMALL_BODY_BYTES",
    "Body",
    "BodyBounds",
    "Bound",
    "ClientLeft",
    "read_body",
    "replaying",
]

SMALL_BODY_BYTES = 1024**2  # /v1/pcrt/stop, a run's resume or migrate: a few fields
_ESCAPES = (b"\\ud", b"\\uD")  # how JSON writes half of a UTF-16 pair


@dataclass(frozen=True)
class Bound:
    """What one route's body may be. ``limit``: the bytes read into memory at most, named
    by ``setting`` in the 413; ``streamed``: the route reads the body itself as it arrives,
    under a bound of its own, and the guard leaves it unread (a peer's signed upload that
    declares no sha256 is the exception: it is read whole, under ``limit``)."""

    limit: int
    setting: str | None = None
    streamed: bool = False

    def refuse_declared(self, size: int | None) -> None:
        """``RequestTooLarge`` when a Content-Length says the body is over the bound."""
        if size is not None and size > self.limit:
            raise RequestTooLarge(self.limit, size, self.setting)


class BodyBounds:
    """The bound of each route's body, from the daemon's settings."""

    def __init__(self, settings: ServerSettings) -> None:
        def bound(setting: str) -> Bound:
            return Bound(getattr(settings, setting), setting)

        chat = bound("max_body_bytes")
        peer = bound("peer_max_body_bytes")
        upload = Bound(settings.peer_max_body_bytes, "peer_max_body_bytes", streamed=True)
        self._routes: dict[tuple[str, str], Bound] = {
            ("POST", "/v1/chat/completions"): chat,
            ("POST", "/v1/completions"): chat,
            ("POST", "/v1/embeddings"): bound("embeddings_max_body_bytes"),
            # the other APIs' generations and embeddings (Ollama's, Anthropic's, Responses')
            ("POST", "/api/chat"): chat,
            ("POST", "/api/generate"): chat,
            ("POST", "/v1/messages"): chat,
            ("POST", "/v1/messages/count_tokens"): chat,
            ("POST", "/v1/responses"): chat,
            ("POST", "/api/embed"): bound("embeddings_max_body_bytes"),
            ("POST", "/api/embeddings"): bound("embeddings_max_body_bytes"),
            ("POST", "/v1/dags"): bound("dag_max_body_bytes"),
            ("POST", SUBGRAPH_PATH): peer,
            ("POST", RUNS_PATH): peer,
            ("POST", MISSING_CHUNKS_PATH): peer,
            ("PUT", CHUNKS_PATH): peer,  # one KV chunk: megabytes, signed, read whole
            ("PUT", "/v1/states"): upload,
            ("PUT", BLOBS_PATH): upload,
        }
        self._small = Bound(SMALL_BODY_BYTES)

    def of(self, method: str, path: str) -> Bound:
        return self._routes.get((method, path), self._small)


class ClientLeft(Exception):
    """The client disconnected before its body was whole: there is no one to answer."""


@dataclass(frozen=True)
class Body:
    """A request body read whole. ``sha256``: its hash, when asked for (a peer's
    signature covers it); ``escapes``: whether it holds ``\\ud`` (or ``\\uD``) anywhere,
    which a JSON body with half of a UTF-16 pair must."""

    data: bytes
    sha256: str | None
    escapes: bool


async def read_body(receive: Receive, bound: Bound, *, hashed: bool = False) -> Body:
    """The body, read as it arrives: ``RequestTooLarge`` the moment it passes ``bound``
    (and no more of it is read), ``ClientLeft`` if the client goes. The hash and the
    escape scan are done a piece at a time, so no step holds the loop for long."""
    pieces: list[bytes] = []
    size = 0
    digest = hashlib.sha256() if hashed else None
    escapes = False
    tail = b""  # the last bytes seen, for an escape split between two pieces
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        piece: bytes = message.get("body", b"")
        if piece:
            size += len(piece)
            if size > bound.limit:
                raise RequestTooLarge(bound.limit, None, bound.setting)
            pieces.append(piece)
            if digest is not None:
                digest.update(piece)
            if not escapes:
                seam = tail + piece[:2]
                escapes = any(e in piece or e in seam for e in _ESCAPES)
                tail = (tail + piece[-2:])[-2:]
        if not message.get("more_body", False):
            break
    return Body(b"".join(pieces), digest.hexdigest() if digest else None, escapes)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app ``body`` (read already) as one message, then
    whatever the client sends next (its disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
