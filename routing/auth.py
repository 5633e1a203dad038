"""The cluster key: how pcrt peers prove to each other that they belong together.

The key is a shared secret from config or the environment. It never travels: not in the
mDNS TXT record, not in a header. Instead:

- a request to a peer carries ``X-PC-Cluster: v2 TS NONCE HOST:PORT MAC``, the MAC an
  HMAC-SHA256 over the time, a fresh nonce, the method, the path, the destination as
  called and the body's sha256; the peer checks the MAC, that the time is within
  ``MAX_SKEW`` seconds, that the destination is itself (a signed request cannot be relayed
  to another member) and that the nonce was not seen before (replay);
- the answer to a node-info request carries ``X-PC-Cluster-Proof``, an HMAC over the
  request's nonce and the body's sha256: the caller learns that the peer holds the key too
  (a node that merely copies someone's mDNS record cannot produce it). The body names the
  node's own addresses and port, and the caller checks the URL it called is one of them,
  so a node relaying someone else's answer does not pass;
- ``pcrt announce`` signs the TXT record of an upstream it announces (address, port and
  fields), so an edge daemon trusts an announced vLLM box only if the announcer had the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

__all__ = [
    "authority_of",
    "CLUSTER_HEADER",
    "MAX_SKEW",
    "PROOF_HEADER",
    "NonceCache",
    "announcement_signature",
    "request_header",
    "response_proof",
    "verify_announcement",
    "verify_proof",
    "verify_request",
]

CLUSTER_HEADER = "X-PC-Cluster"
PROOF_HEADER = "X-PC-Cluster-Proof"
MAX_SKEW = 60.0  # seconds a signed request stays valid; peers' clocks must agree this well


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
    mac = _mac(key, ts, nonce, method.upper(), path, authority, digest)
    return f"v2 {ts} {nonce} {authority or '-'} {mac}"


def nonce_of(header: str) -> str:
    parts = header.split(" ")
    return parts[2] if len(parts) == 5 else ""


def authority_of(header: str) -> str:
    parts = header.split(" ")
    return parts[3] if len(parts) == 5 and parts[3] != "-" else ""


class NonceCache:
    """Nonces seen within the skew window, so a captured request cannot be replayed."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float) -> bool:
        # a request stamped up to MAX_SKEW ahead of our clock stays valid until MAX_SKEW
        # after its stamp: its nonce must be remembered for twice the skew from receipt
        with self._lock:
            while self._seen and (
                len(self._seen) >= self.limit
                or next(iter(self._seen.values())) < now - 2 * MAX_SKEW
            ):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


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
    passes it must then check that the body really hashes to it."""
    if not header:
        return "no cluster signature"
    parts = header.split(" ")
    if len(parts) != 5 or parts[0] != "v2":
        return "malformed cluster signature"
    _, ts, nonce, authority, mac = parts
    authority = "" if authority == "-" else authority
    try:
        sent = float(ts)
    except ValueError:
        return "malformed cluster signature"
    current = time.time() if now is None else now
    if abs(current - sent) > MAX_SKEW:
        return f"cluster signature {current - sent:+.0f} s off this clock"
    digest = body_sha256 if body_sha256 is not None else _body_hash(body)
    expected = _mac(key, ts, nonce, method.upper(), path, authority, digest)
    if not _same(mac, expected):
        return "wrong cluster key (or a changed request)"
    if authority_ok is not None and not authority_ok(authority):
        return f"signed for {authority or 'no destination'}, not this node"
    if not nonces.first_use(nonce, current):
        return "replayed cluster signature"
    return None


def response_proof(key: str, request_header_value: str, body: bytes) -> str:
    """The answerer's proof: HMAC over the caller's nonce and the body it sends back."""
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
