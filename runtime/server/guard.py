"""The check every request passes before any route sees it: who may call (the API key, or a
peer's cluster signature), how large its body may be, and whether its JSON body is text.

``Guard`` is a pure ASGI middleware in front of FastAPI: it sees a request's headers
before anything reads its body, so a request without the key is a 401 that costs no body
(its ``Connection: close`` tells the client not to send one), and a Content-Length over
the route's bound (``bodies.py``) a 413 before a byte is read. A request that passed reads
its body here, under that bound, and the app gets it replayed: FastAPI parses nothing
that was not admitted. Responses are never wrapped, so a token stream pays one call per
request, not per token.

A peer proves the cluster key instead of holding our API key. What the signature says
without the body (its MAC over the request line, its clock, its destination, its nonce)
is checked from the header, so a forged, stale or replayed one costs no body; its MAC
over the body's sha256 is checked once the body is read (under the route's bound, hashed
as it arrives), before anything parses it. A blob upload declares its sha256 up front and is
checked before it is read; its route streams it to disk and holds it to that hash. The
verdict is left in ``request.state.peer_verified`` for the routes for peers (the nonce is
spent here, once).

Every path needs the key, ``/health`` alone excepted: the OpenAPI schema and its pages
(``/openapi.json``, ``/docs``, ``/redoc``) too, since they list every route. The
dashboard's login page (``/ui/login``, its script and stylesheet) is where a person gives
the key, so it needs none (its body is bounded like any other); the dashboard's pages open
with its cookie too (``ui_session``: pages only, every call needs the key), and a browser
asking for one without either is sent to the login page.

A daemon without a key (on loopback: ``check_exposure``) still faces web pages in the
browsers of its own machine: it answers only requests that name it by a loopback name or
an ``allowed_hosts`` one (a page that rebinds its own DNS name to 127.0.0.1 sends that
name as Host), and none sent by another site's page (its Origin), which could start
work blind.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pcrt.routing.auth import CLUSTER_HEADER
from pcrt.runtime.errors import (
    BadContentLength,
    HostRefused,
    InvalidRequest,
    PcrtError,
    Unauthorized,
)
from pcrt.runtime.server.bodies import Body, BodyBounds, Bound, ClientLeft, read_body, replaying
from pcrt.runtime.server.http_errors import error_response
from pcrt.runtime.server.services import services_of
from pcrt.runtime.server.settings import is_loopback
from pcrt.runtime.server.ui_session import (
    KEYLESS_PATHS,
    LOGIN_PATH,
    is_ui_page,
    opens_pages,
    session_of,
)
from pcrt.runtime.server.uploads import streamed_body_sha256
from pcrt.runtime.textcheck import broken_text_at
from pcrt.runtime.threads import to_thread_to_completion

__all__ = [
    "OPEN_PATHS",
    "Guard",
    "host_allowed",
    "key_matches",
    "origin_allowed",
    "refuse_broken_text",
]

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})  # what answers without the key
_SIGNATURE = CLUSTER_HEADER.lower().encode()
_EMPTY = Body(b"", hashlib.sha256(b"").hexdigest(), escapes=False)


def key_matches(authorization: bytes | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header's value is ``Bearer <api_key>``. The key is
    compared in constant time (``hmac.compare_digest``): how long a wrong key takes to
    refuse says nothing about how much of it was right."""
    scheme, _, given = (authorization or b"").partition(b" ")
    # both sides are compared whatever the scheme, so a wrong scheme costs the same time
    same = hmac.compare_digest(given.strip(), api_key.encode())
    return same and scheme.lower() == b"bearer"


@dataclass(frozen=True)
class _Head:
    """What the guard reads of a request's headers, in one pass over them."""

    authorization: bytes | None = None
    api_key: bytes | None = None  # Anthropic's clients send the key as X-Api-Key
    signature: str | None = None
    content_length: bytes | None = None
    chunked: bool = False
    content_type: bytes | None = None
    cookie: bytes | None = None  # the dashboard's pages open with a cookie (``ui_session``)
    host: bytes | None = None
    origin: bytes | None = None  # browsers send it with cross-origin calls (and POSTs)

    @classmethod
    def of(cls, scope: Scope) -> _Head:
        found: dict[str, bytes] = {}
        for name, value in scope["headers"]:
            if name == b"authorization":
                found["authorization"] = value
            elif name == b"x-api-key":
                found["api_key"] = value
            elif name == _SIGNATURE:
                found["signature"] = value
            elif name == b"content-length":
                found["content_length"] = value
            elif name == b"transfer-encoding":
                found["transfer_encoding"] = value
            elif name == b"content-type":
                found["content_type"] = value
            elif name == b"cookie":
                found["cookie"] = value
            elif name == b"host":
                found["host"] = value
            elif name == b"origin":
                found["origin"] = value
        signature = found.get("signature")
        return cls(
            authorization=found.get("authorization"),
            api_key=found.get("api_key"),
            signature=signature.decode("latin-1") if signature is not None else None,
            content_length=found.get("content_length"),
            chunked=b"chunked" in found.get("transfer_encoding", b"").lower(),
            content_type=found.get("content_type"),
            cookie=found.get("cookie"),
            host=found.get("host"),
            origin=found.get("origin"),
        )

    def declared_size(self) -> int | None:
        if self.content_length is None:
            return None
        try:
            size = int(self.content_length)
        except ValueError:
            size = -1
        if size < 0:
            shown = self.content_length.decode("latin-1")
            raise BadContentLength(f"bad Content-Length {shown!r}")
        return size

    def proves(self, api_key: str) -> bool:
        """Whether the request carries the key, as a bearer token or as ``X-Api-Key``
        (each compared in constant time)."""
        bearer = key_matches(self.authorization, api_key)
        header = hmac.compare_digest((self.api_key or b"").strip(), api_key.encode())
        return bearer or (self.api_key is not None and header)

    @property
    def has_body(self) -> bool:
        return self.chunked or (self.content_length is not None and self.content_length != b"0")

    @property
    def may_be_json(self) -> bool:
        """FastAPI parses a body without a Content-Type as JSON too."""
        return self.content_type is None or b"json" in self.content_type.lower()


class Guard:
    """The middleware (``app.add_middleware(Guard, api_key=..., bounds=...)``);
    ``api_key`` None: no key is asked of local users."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        bounds: BodyBounds,
        ui_cookie: str,
        allowed_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.bounds = bounds
        self.ui_cookie = ui_cookie  # the dashboard's cookie name (``ui_session``)
        self.allowed_hosts = allowed_hosts  # beyond loopback names, for a keyless daemon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        head = _Head.of(scope)
        try:
            receive = await self._admit(scope, receive, head)
        except ClientLeft:
            return  # nobody to answer
        except PcrtError as exc:
            response = _refusal(exc, scope)
            if head.has_body:  # the body was not read: the connection cannot carry another
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive, head: _Head) -> Receive:
        """The ``receive`` the app gets (the body replayed), or the error that refuses it."""
        bound = self.bounds.of(scope["method"], scope["path"])
        if head.signature is not None:
            return await self._admit_peer(scope, receive, head, bound)
        if self.api_key is None:
            self._refuse_foreign_pages(head)
        if self.api_key is not None and not self._lets_in(scope, head, self.api_key):
            raise Unauthorized(
                "missing or wrong API key (send Authorization: Bearer KEY, or X-Api-Key: KEY)"
            )
        size = head.declared_size()
        if not head.has_body or bound.streamed:
            return receive  # nothing to read, or the route streams it under its own bound
        bound.refuse_declared(size)
        body = await read_body(receive, bound)
        return await _admitted(body, head, receive)

    def _refuse_foreign_pages(self, head: _Head) -> None:
        """A keyless daemon answers its own loopback names only, and no other site's page:
        a page that rebinds its name to this machine would read it (Host), and any page
        can make a browser post to 127.0.0.1 (Origin: work started blind)."""
        if not host_allowed(head.host, self.allowed_hosts):
            shown = (head.host or b"").decode("latin-1")[:100]
            raise HostRefused(
                f"this daemon has no API key, so it answers only to loopback names "
                f"(localhost, 127.0.0.1, [::1]), not {shown!r}: a page that rebinds its "
                "own name to this machine would read it. Set an API key, or add the "
                "name to allowed_hosts"
            )
        if head.origin is not None and not origin_allowed(head.origin, self.allowed_hosts):
            shown = head.origin.decode("latin-1")[:100]
            raise HostRefused(
                f"this daemon has no API key, so it answers no web page but its own, not "
                f"one from {shown!r} (any page could make a browser call it). Set an API "
                "key, or add the page's host name to allowed_hosts"
            )

    def _lets_in(self, scope: Scope, head: _Head, api_key: str) -> bool:
        """The key, or a path that needs none, or a dashboard page read with its cookie."""
        if scope["path"] in KEYLESS_PATHS or head.proves(api_key):
            return True
        session = session_of(head.cookie, self.ui_cookie)
        return opens_pages(session, api_key, scope["method"], scope["path"])

    async def _admit_peer(
        self, scope: Scope, receive: Receive, head: _Head, bound: Bound
    ) -> Receive:
        assert head.signature is not None
        request = Request(scope)
        coordinator = services_of(request).coordinator
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        # before a byte of the body is read: a forged, stale or replayed signature
        why = coordinator.precheck_peer_request(head.signature, scope["method"], target)
        if why is not None:
            log.warning("refused a peer request to %s: %s", scope["path"], why)
            raise Unauthorized(f"cluster signature refused: {why}")
        size = head.declared_size()
        declared = streamed_body_sha256(request) if bound.streamed else None
        body: Body | None = None
        if declared is None:
            bound.refuse_declared(size)
            body = await read_body(receive, bound, hashed=True) if head.has_body else _EMPTY
            declared = body.sha256
        why = coordinator.check_peer_request(
            head.signature, scope["method"], target, body_sha256=declared
        )
        if why is not None:
            log.warning("refused a peer request to %s: %s", scope["path"], why)
            raise Unauthorized(f"cluster signature refused: {why}")
        request.state.peer_verified = True
        if body is None:  # a blob: its route streams it and holds it to the signed hash
            return receive
        return await _admitted(body, head, receive)


def _refusal(exc: PcrtError, scope: Scope) -> Response:
    """The error in its API's shape; a person's browser asking for a dashboard page
    without the key is sent to the page where they give it."""
    path = scope["path"]
    if isinstance(exc, Unauthorized) and scope["method"] in ("GET", "HEAD") and is_ui_page(path):
        return RedirectResponse(LOGIN_PATH, status_code=303)
    return error_response(exc, path)


def host_allowed(host: bytes | None, allowed: frozenset[str]) -> bool:
    """Whether a keyless daemon answers a request naming ``host`` (its ``Host`` header):
    a loopback name or address, or one of ``allowed``. A request without one (HTTP/1.0)
    passes: no browser sends one."""
    if host is None:
        return True
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [::1]:11435
        name = text[1 : text.find("]")] if "]" in text else text
    else:
        name = text.rpartition(":")[0] if text.count(":") == 1 else text
    name = name.rstrip(".")
    return name in allowed or name.endswith(".localhost") or is_loopback(name)


def origin_allowed(origin: bytes, allowed: frozenset[str]) -> bool:
    """Whether a keyless daemon answers a page from ``origin`` (``scheme://host[:port]``):
    one served by a loopback name or an allowed one. ``null`` (a sandboxed frame, a file)
    is no page of ours."""
    scheme, sep, rest = origin.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return False
    return host_allowed(rest.split(b"/", 1)[0], allowed)


async def _admitted(body: Body, head: _Head, receive: Receive) -> Receive:
    if body.escapes and head.may_be_json:
        await refuse_broken_text(body.data)
    return replaying(body.data, receive)


async def refuse_broken_text(body: bytes) -> None:
    """A JSON body may escape half of a UTF-16 pair ("\\ud800"). Python decodes it to a
    str that is no UTF-8 text: the tokenizer, SQLite and the answer would each fail on it
    later, some after work was done or recorded. It is a 400 before anything runs. Only a
    body that holds such an escape is decoded here, in a worker thread."""
    where = await to_thread_to_completion(_broken_text_in, body)
    if where is not None:
        raise InvalidRequest(
            f"{where} holds an unpaired UTF-16 surrogate escape (like \\ud800): not text"
        )


def _broken_text_in(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # FastAPI answers malformed JSON itself
    return broken_text_at(data)
