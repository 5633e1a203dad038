"""The cluster key: how pcrt peers prove to each other that they belong together.

The key is a shared secret from config or the environment. It never travels: not in the
mDNS TXT record, not in a header. Instead:

- a request to a peer carries ``X-PC-Cluster: v3 TS NONCE HOST:PORT HEAD MAC``, MAC an
  HMAC-SHA256 over the time, a fresh nonce, the method, the path, the destination as
  called and the body's sha256, and HEAD the same without the body. The peer checks,
  before it reads a byte of the body (``precheck_request``), HEAD, that the time is within
  ``MAX_SKEW`` seconds, that the destination is itself (a signed request cannot be relayed
  to another member) and that the nonce was not seen before (replay); then, the body
  read, MAC. Without HEAD anyone who can reach the port could make a node read and hash
  a peer route's whole body bound (64 MiB) per request before the MAC failed;
- a nonce is remembered until its request's own stamp leaves the window (``MAX_SKEW``
  after it), never forgotten earlier: a replay is refused for as long as its clock check
  would pass. Memory is bounded by refusing, not forgetting: with ``NonceCache.limit``
  nonces in the window a new signed request is ``Overloaded`` (503, retry after the
  oldest expires);
- every answer that carries results (node info, a subgraph's node records, a moved
  run's and its states' acknowledgements) carries ``X-PC-Cluster-Proof``, an HMAC over
  the request's nonce and the body's sha256: the caller learns that the peer holds the
  key too (a node that merely copies someone's mDNS record cannot produce it), that the
  answer is to this request (not one captured from another exchange) and that not a byte
  changed on the way. The node-info body names the node's own addresses and port, and
  the caller checks the URL it called is one of them, so a node relaying someone else's
  answer does not pass; it also says ``signed_replies`` (``SIGNED_REPLIES``): a pcrt of
  an older version, whose other answers carry no proof, is never trusted with work;
- ``pcrt announce`` signs the TXT record of an upstream it announces (address, port and
  fields), so an edge daemon trusts an announced vLLM box only if the announcer had the key.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pcrt.runtime.errors import Overloaded

__all__ = [
    "authority_of",
    "CLUSTER_HEADER",
    "MAX_SKEW",
    "PROOF_HEADER",
    "SIGNED_REPLIES",
    "WRONG_KEY",
    "NonceCache",
    "announcement_signature",
    "request_header",
    "response_proof",
    "verify_announcement",
    "verify_proof",
    "precheck_request",
    "verify_request",
]

CLUSTER_HEADER = "X-PC-Cluster"
PROOF_HEADER = "X-PC-Cluster-Proof"
MAX_SKEW = 60.0  # seconds a signed request stays valid; peers' clocks must agree this well
# the node-info field that says this node proves every answer carrying results
SIGNED_REPLIES = "signed_replies"
WRONG_KEY = "wrong cluster key (or a changed request)"
_VERSION = "v3"  # v2 had no HEAD: a node of this version refuses it
_FIELDS = 6


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison that refuses, rather than raises on, non-ASCII input."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def _mac(key: str, *parts: str) -> str:
    message = "\n".join(parts).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def _body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def request_header(
    key: str,
    method: str,
    path: str,
    *,
    authority: str = "",
    body: bytes = b"",
    body_sha256: str | None = None,
    now: float | None = None,
) -> str:
    """The ``X-PC-Cluster`` value for one request (a new nonce each time).

    It binds the destination (``host:port`` as called) and the body: a peer that receives
    it cannot relay it to another member, nor swap the body. ``body_sha256``: the body's
    hash when it is already known (a blob streamed from disk under its sha256 name)."""
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(12)
    digest = body_sha256 if body_sha256 is not None else _body_hash(body)
    head = _head_mac(key, ts, nonce, method, path, authority)
    mac = _mac(key, ts, nonce, method.upper(), path, authority, digest)
    return f"{_VERSION} {ts} {nonce} {authority or '-'} {head} {mac}"


def _head_mac(key: str, ts: str, nonce: str, method: str, path: str, authority: str) -> str:
    """The MAC of a request without its body: checkable before the body is read."""
    return _mac(key, "head", ts, nonce, method.upper(), path, authority)


def nonce_of(header: str) -> str:
    parts = header.split(" ")
    return parts[2] if len(parts) == _FIELDS else ""


def authority_of(header: str) -> str:
    parts = header.split(" ")
    return parts[3] if len(parts) == _FIELDS and parts[3] != "-" else ""


class NonceCache:
    """The nonces of accepted signed requests, so a captured request cannot be replayed.

    Each is kept until its request's own stamp leaves the skew window (``MAX_SKEW`` after
    the stamp), when the clock check alone refuses a replay; never earlier, whatever the
    traffic. Memory is bounded by refusing: with ``limit`` nonces in the window (about
    250 bytes each), a new request raises ``Overloaded`` until the oldest expires."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten
        self._expiries: list[tuple[float, str]] = []  # the same as a heap: soonest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, nonce: str, now: float) -> bool:
        """Whether ``nonce`` is remembered (and not yet expired at ``now``)."""
        with self._lock:
            expires = self._seen.get(nonce)
            return expires is not None and expires >= now

    def first_use(self, nonce: str, now: float, *, stamped: float | None = None) -> bool:
        """True (and the nonce is remembered) if ``nonce`` was not seen in the window.
        ``stamped``: the time its request was signed; unknown, the latest a request valid
        ``now`` may carry (``now + MAX_SKEW``). Raises ``Overloaded`` when full."""
        expires = (now + MAX_SKEW if stamped is None else stamped) + MAX_SKEW
        with self._lock:
            while self._expiries and self._expiries[0][0] < now:
                _, old = heapq.heappop(self._expiries)
                del self._seen[old]
            if nonce in self._seen:
                return False
            if len(self._seen) >= self.limit:
                wait = self._expiries[0][0] - now
                raise Overloaded(
                    f"this node holds the nonces of {self.limit} signed peer requests, the "
                    f"most it remembers within {MAX_SKEW:.0f} s of their stamps; retry in "
                    f"{max(1.0, wait):.0f} s",
                    retry_after=max(1.0, wait),
                )
            self._seen[nonce] = expires
            heapq.heappush(self._expiries, (expires, nonce))
            return True


@dataclass(frozen=True)
class _Signed:
    """The fields of a signature header."""

    ts: str
    sent: float
    nonce: str
    authority: str
    head: str
    mac: str


def _signed_fields(header: str | None) -> _Signed | str:
    """The fields of a v3 signature header, or why it is none."""
    if not header:
        return "no cluster signature"
    parts = header.split(" ")
    if len(parts) != _FIELDS or parts[0] != _VERSION:
        return "malformed cluster signature"
    _, ts, nonce, authority, head, mac = parts
    try:
        sent = float(ts)
    except ValueError:
        return "malformed cluster signature"
    return _Signed(ts, sent, nonce, "" if authority == "-" else authority, head, mac)


def precheck_request(
    key: str,
    header: str | None,
    method: str,
    path: str,
    nonces: NonceCache,
    *,
    authority_ok: Callable[[str], bool] | None = None,
    now: float | None = None,
) -> str | None:
    """Why a signature is refused whatever the body, or None: its form, its MAC without
    the body (HEAD), its clock, its destination and its nonce (not spent here). A
    request forged without the key, stale, re-targeted or replayed costs no body (up to
    the peer routes' 64 MiB) and no hashing."""
    current = time.time() if now is None else now
    checked = _checked_head(key, header, method, path, nonces, authority_ok, current)
    return checked if isinstance(checked, str) else None


def _checked_head(
    key: str,
    header: str | None,
    method: str,
    path: str,
    nonces: NonceCache,
    authority_ok: Callable[[str], bool] | None,
    now: float,
) -> _Signed | str:
    """The header's fields once all but the body's MAC check out; else why not."""
    signed = _signed_fields(header)
    if isinstance(signed, str):
        return signed
    head = _head_mac(key, signed.ts, signed.nonce, method, path, signed.authority)
    if not _same(signed.head, head):
        return WRONG_KEY
    if abs(now - signed.sent) > MAX_SKEW:
        return f"cluster signature {now - signed.sent:+.0f} s off this clock"
    if authority_ok is not None and not authority_ok(signed.authority):
        return f"signed for {signed.authority or 'no destination'}, not this node"
    if nonces.seen(signed.nonce, now):
        return "replayed cluster signature"
    return signed


def verify_request(
    key: str,
    header: str | None,
    method: str,
    path: str,
    nonces: NonceCache,
    *,
    body: bytes = b"",
    body_sha256: str | None = None,
    authority_ok: Callable[[str], bool] | None = None,
    now: float | None = None,
) -> str | None:
    """None when the header proves the key; else why not (for the log, not the caller).
    ``authority_ok`` says whether the signed destination is this node. ``body_sha256``:
    the hash the body is declared to have, for a body streamed to disk unread; whoever
    passes it must then check that the body really hashes to it. Raises ``Overloaded``
    when ``nonces`` is full (a valid request that cannot be remembered is not let in)."""
    current = time.time() if now is None else now
    signed = _checked_head(key, header, method, path, nonces, authority_ok, current)
    if isinstance(signed, str):
        return signed
    digest = body_sha256 if body_sha256 is not None else _body_hash(body)
    expected = _mac(key, signed.ts, signed.nonce, method.upper(), path, signed.authority, digest)
    if not _same(signed.mac, expected):
        return WRONG_KEY
    if not nonces.first_use(signed.nonce, current, stamped=signed.sent):  # a race loses here
        return "replayed cluster signature"
    return None


def response_proof(key: str, request_header_value: str, body: bytes) -> str:
    """The answerer's proof: HMAC over the caller's nonce and the body it sends back (one
    sha256 of the body, then an HMAC of a few dozen bytes)."""
    return _mac(key, "proof", nonce_of(request_header_value), hashlib.sha256(body).hexdigest())


def verify_proof(key: str, request_header_value: str, body: bytes, proof: str | None) -> bool:
    if not proof:
        return False
    return _same(proof, response_proof(key, request_header_value, body))


def _announcement_material(address: str, port: int, fields: Mapping[str, str]) -> list[str]:
    # JSON, not joined lines: a value with a newline cannot pass for two fields
    signed = sorted((k, v) for k, v in fields.items() if k != "sig")
    return ["announce", json.dumps([address, port, signed])]


def announcement_signature(key: str, address: str, port: int, fields: Mapping[str, str]) -> str:
    """A short signature over an announced upstream's address, port and TXT fields."""
    return _mac(key, *_announcement_material(address, port, fields))[:32]


def verify_announcement(
    key: str, address: str, port: int, fields: Mapping[str, str], signature: str | None
) -> bool:
    if not signature:
        return False
    expected = announcement_signature(key, address, port, fields)
    return _same(signature, expected)
