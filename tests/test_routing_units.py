"""Fast unit tests for the routing pieces: the cluster-key signatures (``auth.py``), the peer
table (``peers.py``), SSE splitting and the HTTP forwarder (``forward.py``, against a tiny
uvicorn server on loopback), the ``[peers]`` config section (``runtime/settings.py``), and
migration's state-key check, record retry and low-battery trigger (``statekey.py``,
``migrate.py``, ``battery.py``).

No model, no mDNS, no daemon: the whole file runs in a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

import aiohttp
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.device.profile import Battery
from pcrt.routing.auth import (
    CLUSTER_HEADER,
    MAX_SKEW,
    NonceCache,
    announcement_signature,
    request_header,
    response_proof,
    verify_announcement,
    verify_proof,
    verify_request,
)
from pcrt.routing.battery import LowBattery
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.forward import ForwardedStream, Forwarder, PeerAnswer, sse_events
from pcrt.routing.migrate import BLOBS_PATH, RUNS_PATH, migrate_run, refusal_of
from pcrt.routing.peers import (
    Peer,
    PeerTable,
    cooldown_seconds,
    offers_from_models,
    offers_from_node_info,
    state_keys_from_node_info,
)
from pcrt.routing.policy import ModelOffer, NodeView
from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.routing.statekey import EngineKey, key_mismatches
from pcrt.runtime.engine.state import CompatKey, KVState, StateHeader
from pcrt.runtime.errors import ConfigError, Overloaded, PeerRejected, PeerUnavailable
from pcrt.runtime.server.services import Services
from pcrt.runtime.server.settings import ServerSettings

WRONG = "wrong cluster key (or a changed request)"
KEY = "correct horse battery staple"
OTHER_KEY = "a different cluster"
T0 = 1_700_000_000.0  # a fixed wall-clock time for the signature tests

# ---------------------------------------------------------------------------------------
# auth.py: signed requests
# ---------------------------------------------------------------------------------------


def test_request_signed_with_the_key_verifies() -> None:
    header = request_header(KEY, "post", "/v1/chat/completions", now=T0)
    # the method is case-insensitive on both sides
    assert verify_request(KEY, header, "POST", "/v1/chat/completions", NonceCache(), now=T0) is None


def test_every_request_header_has_a_fresh_nonce() -> None:
    first = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    second = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    assert first.split(" ")[2] != second.split(" ")[2]
    assert first != second


def test_request_signed_with_another_key_is_refused() -> None:
    header = request_header(OTHER_KEY, "GET", "/v1/pcrt/node", now=T0)
    reason = verify_request(KEY, header, "GET", "/v1/pcrt/node", NonceCache(), now=T0)
    assert reason == WRONG


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/pcrt/node"), ("GET", "/v1/pcrt/nodes"), ("GET", "/v1/pcrt/node?x=1")],
)
def test_tampered_method_or_path_is_refused(method: str, path: str) -> None:
    header = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    assert verify_request(KEY, header, method, path, NonceCache(), now=T0) == WRONG


@pytest.mark.parametrize("offset", [MAX_SKEW + 1, -(MAX_SKEW + 1), 3600.0, -3600.0])
def test_stale_or_future_timestamp_beyond_the_skew_is_refused(offset: float) -> None:
    # signed at T0, checked at T0 + offset: offset > 0 is a stale request, < 0 a future one
    header = request_header(KEY, "GET", "/p", now=T0)
    reason = verify_request(KEY, header, "GET", "/p", NonceCache(), now=T0 + offset)
    assert reason is not None
    assert "off this clock" in reason


@pytest.mark.parametrize("offset", [MAX_SKEW - 1, -(MAX_SKEW - 1), 0.0])
def test_timestamp_within_the_skew_is_accepted(offset: float) -> None:
    header = request_header(KEY, "GET", "/p", now=T0)
    assert verify_request(KEY, header, "GET", "/p", NonceCache(), now=T0 + offset) is None


def test_an_out_of_skew_request_does_not_burn_its_nonce() -> None:
    """The clock check comes before the nonce is recorded: a refused request is not 'seen'."""
    nonces = NonceCache()
    header = request_header(KEY, "GET", "/p", now=T0)
    assert verify_request(KEY, header, "GET", "/p", nonces, now=T0 + 10 * MAX_SKEW) is not None
    assert verify_request(KEY, header, "GET", "/p", nonces, now=T0) is None


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "no cluster signature"),
        ("", "no cluster signature"),
        ("garbage", "malformed cluster signature"),
        ("v2 1700000000.000 abc -", "malformed cluster signature"),
        ("v2 1700000000.000 abc - def extra", "malformed cluster signature"),
        ("v1 1700000000.000 abc - def", "malformed cluster signature"),  # the old format
        ("v2 yesterday abc - def", "malformed cluster signature"),
        ("v2 1700000000.000 abc - def", WRONG),  # well-formed, bad MAC
    ],
)
def test_malformed_headers_are_refused_with_a_reason(header: str | None, reason: str) -> None:
    assert verify_request(KEY, header, "GET", "/p", NonceCache(), now=T0) == reason


def test_a_replayed_request_is_refused() -> None:
    nonces = NonceCache()
    header = request_header(KEY, "GET", "/p", now=T0)
    assert verify_request(KEY, header, "GET", "/p", nonces, now=T0) is None
    reason = verify_request(KEY, header, "GET", "/p", nonces, now=T0 + 5)
    assert reason == "replayed cluster signature"
    # a separately signed request for the same call is fine
    fresh = request_header(KEY, "GET", "/p", now=T0 + 5)
    assert verify_request(KEY, fresh, "GET", "/p", nonces, now=T0 + 5) is None


def test_a_bad_mac_does_not_poison_the_nonce_of_the_real_request() -> None:
    """A forger who copies a nonce with a wrong MAC must not get the real request refused."""
    nonces = NonceCache()
    real = request_header(KEY, "GET", "/p", now=T0)
    version, ts, nonce, authority, _ = real.split(" ")
    forged = f"{version} {ts} {nonce} {authority} {'0' * 64}"
    assert verify_request(KEY, forged, "GET", "/p", nonces, now=T0) == WRONG
    assert verify_request(KEY, real, "GET", "/p", nonces, now=T0) is None


def test_nonce_cache_remembers_within_twice_the_skew_and_forgets_after() -> None:
    # a request may be stamped MAX_SKEW ahead and stays valid MAX_SKEW after its stamp
    cache = NonceCache()
    assert cache.first_use("a", T0)
    assert not cache.first_use("a", T0 + 2 * MAX_SKEW)  # still inside the window
    cache = NonceCache()
    assert cache.first_use("a", T0)
    assert cache.first_use("b", T0 + 2 * MAX_SKEW + 1)  # "a" is evicted by this call
    assert cache.first_use("a", T0 + 2 * MAX_SKEW + 1)
    assert not cache.first_use("b", T0 + 2 * MAX_SKEW + 1)


def test_nonce_cache_evicts_old_entries_so_it_does_not_grow_forever() -> None:
    cache = NonceCache()
    for i in range(50):
        assert cache.first_use(f"n{i}", T0 + i * 0.01)
    assert cache.first_use("late", T0 + 2 * MAX_SKEW + 1)
    assert len(cache._seen) == 1


def test_nonce_cache_respects_its_limit_evicting_the_oldest() -> None:
    cache = NonceCache(limit=3)
    for i, nonce in enumerate("abcd"):
        assert cache.first_use(nonce, T0 + i)
    assert len(cache._seen) == 3
    assert not cache.first_use("d", T0 + 4)  # recent ones are still remembered
    assert not cache.first_use("c", T0 + 4)
    # the oldest was pushed out by the limit (while still inside the time window)
    assert cache.first_use("a", T0 + 4)
    assert len(cache._seen) <= 3


def test_a_future_stamped_request_cannot_be_replayed_after_its_nonce_is_evicted() -> None:
    nonces = NonceCache()
    # a peer whose clock is 50 s ahead (allowed: within MAX_SKEW) signs a request
    header = request_header(KEY, "GET", "/p", now=T0 + 50)
    assert verify_request(KEY, header, "GET", "/p", nonces, now=T0) is None
    # 61 s later the signature is still fresh (11 s old by its own stamp) ...
    later = T0 + MAX_SKEW + 1
    nonces.first_use("unrelated", later)  # any traffic evicts entries older than later - 60
    # ... and the captured header must still be refused as a replay
    assert verify_request(KEY, header, "GET", "/p", nonces, now=later) is not None


def test_non_ascii_mac_is_refused_not_raised() -> None:
    header = f"v2 {T0:.3f} abc - \u00e9"
    assert verify_request(KEY, header, "GET", "/p", NonceCache(), now=T0) == WRONG


def test_the_signature_binds_the_destination_and_the_body() -> None:
    header = request_header(KEY, "POST", "/p", authority="10.0.0.2:11435", body=b"{}", now=T0)

    def only(authority: str) -> Callable[[str], bool]:
        return lambda signed: signed == authority

    def check(body: bytes, mine: str) -> str | None:
        return verify_request(
            KEY, header, "POST", "/p", NonceCache(), body=body, authority_ok=only(mine), now=T0
        )

    assert check(b"{}", "10.0.0.2:11435") is None
    assert check(b'{"x": 1}', "10.0.0.2:11435") == WRONG  # the body was swapped
    assert "not this node" in (check(b"{}", "10.0.0.3:11435") or "")  # relayed elsewhere


# ---------------------------------------------------------------------------------------
# auth.py: response proofs
# ---------------------------------------------------------------------------------------


def test_response_proof_verifies_with_the_same_key() -> None:
    header = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    body = b'{"node_id": "n1"}'
    proof = response_proof(KEY, header, body)
    assert verify_proof(KEY, header, body, proof)


def test_response_proof_with_another_key_fails() -> None:
    header = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    body = b'{"node_id": "n1"}'
    assert not verify_proof(KEY, header, body, response_proof(OTHER_KEY, header, body))


def test_response_proof_for_a_changed_body_fails() -> None:
    header = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    proof = response_proof(KEY, header, b'{"node_id": "n1"}')
    assert not verify_proof(KEY, header, b'{"node_id": "n2"}', proof)


def test_response_proof_for_another_requests_nonce_fails() -> None:
    """A proof captured from one exchange cannot vouch for another one."""
    body = b'{"node_id": "n1"}'
    first = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    second = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    assert not verify_proof(KEY, second, body, response_proof(KEY, first, body))


@pytest.mark.parametrize("proof", [None, ""])
def test_missing_response_proof_fails(proof: str | None) -> None:
    header = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    assert not verify_proof(KEY, header, b"{}", proof)


def test_non_ascii_response_proof_fails_without_raising() -> None:
    header = request_header(KEY, "GET", "/v1/pcrt/node", now=T0)
    assert not verify_proof(KEY, header, b"{}", "\u00e9" * 64)


# ---------------------------------------------------------------------------------------
# auth.py: signed announcements
# ---------------------------------------------------------------------------------------

FIELDS = {"kind": "vllm", "id": "box-1", "path": "/v1", "tags": "complex", "strength": "70"}


def test_announcement_signature_verifies_and_ignores_field_order() -> None:
    sig = announcement_signature(KEY, "10.0.0.5", 8000, FIELDS)
    reordered = dict(reversed(list(FIELDS.items())))
    assert list(reordered) != list(FIELDS)
    assert announcement_signature(KEY, "10.0.0.5", 8000, reordered) == sig
    assert verify_announcement(KEY, "10.0.0.5", 8000, reordered, sig)


def test_announcement_signature_excludes_the_sig_field_itself() -> None:
    sig = announcement_signature(KEY, "10.0.0.5", 8000, FIELDS)
    # the TXT record as received carries the signature among its fields
    received = {**FIELDS, "sig": sig}
    assert announcement_signature(KEY, "10.0.0.5", 8000, received) == sig
    assert verify_announcement(KEY, "10.0.0.5", 8000, received, received["sig"])


def test_announcement_with_another_key_fails() -> None:
    sig = announcement_signature(OTHER_KEY, "10.0.0.5", 8000, FIELDS)
    assert not verify_announcement(KEY, "10.0.0.5", 8000, FIELDS, sig)


@pytest.mark.parametrize(
    ("address", "port", "fields"),
    [
        ("10.0.0.6", 8000, FIELDS),
        ("10.0.0.5", 8001, FIELDS),
        ("10.0.0.5", 8000, {**FIELDS, "kind": "openai"}),
        ("10.0.0.5", 8000, {**FIELDS, "tags": "simple"}),
        ("10.0.0.5", 8000, {**FIELDS, "path": "/"}),
        ("10.0.0.5", 8000, {**FIELDS, "keyenv": "STOLEN"}),  # an added field
        ("10.0.0.5", 8000, {k: v for k, v in FIELDS.items() if k != "strength"}),  # removed
    ],
)
def test_changed_announcement_fails(address: str, port: int, fields: dict[str, str]) -> None:
    sig = announcement_signature(KEY, "10.0.0.5", 8000, FIELDS)
    assert not verify_announcement(KEY, address, port, fields, sig)


@pytest.mark.parametrize("signature", [None, ""])
def test_unsigned_announcement_fails(signature: str | None) -> None:
    assert not verify_announcement(KEY, "10.0.0.5", 8000, FIELDS, signature)


def test_merging_fields_through_a_newline_breaks_the_signature() -> None:
    signed = {"strength": "70", "tags": "complex"}
    sig = announcement_signature(KEY, "10.0.0.5", 8000, signed)
    merged = {"strength": "70\ntags=complex"}  # "tags" is gone, "strength" no longer parses
    assert not verify_announcement(KEY, "10.0.0.5", 8000, merged, sig)


def test_non_ascii_announcement_signature_fails_without_raising() -> None:
    assert not verify_announcement(KEY, "10.0.0.5", 8000, FIELDS, "\u00e9" * 32)


# ---------------------------------------------------------------------------------------
# peers.py
# ---------------------------------------------------------------------------------------


def _peer(
    name: str = "p",
    url: str = "http://10.0.0.9:11435",
    kind: Literal["pcrt", "vllm", "openai"] = "pcrt",
    **kw: Any,
) -> Peer:
    return Peer(name=name, url=url, kind=kind, source="mdns", **kw)


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [
        (-1, 0.0),
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (5, 16.0),
        (6, 30.0),
        (7, 30.0),
        (50, 30.0),
    ],
)
def test_cooldown_backoff_doubles_and_is_capped(failures: int, seconds: float) -> None:
    assert cooldown_seconds(failures) == seconds


def test_cooldown_stays_capped_for_a_peer_that_has_been_down_for_hours() -> None:
    assert cooldown_seconds(1025) == 30.0
    table = PeerTable()
    table.upsert(_peer(failures=1024))
    table.record_failure("p", "connection refused", now=100.0)
    peer = table.get("p")
    assert peer is not None
    assert peer.cooldown_until == 130.0


def test_record_failure_takes_the_peer_out_of_rotation_with_backoff() -> None:
    table = PeerTable()
    table.upsert(_peer(trusted=True))
    table.record_success("p", 0.01)
    peer = table.get("p")
    assert peer is not None and peer.in_rotation(100.0)

    table.record_failure("p", "connection refused", now=100.0)
    assert (peer.failures, peer.healthy, peer.last_error) == (1, False, "connection refused")
    assert peer.cooldown_until == 101.0
    assert peer.next_check == peer.cooldown_until
    assert not peer.in_rotation(100.5)
    assert table.due(100.5) == []
    assert table.due(101.0) == [peer]

    table.record_failure("p", "timeout", now=101.0)
    assert peer.cooldown_until == 103.0  # second failure: 2 s
    assert peer.next_check == 103.0
    table.record_failure("p", "timeout", now=103.0)
    assert peer.cooldown_until == 107.0  # third: 4 s
    assert peer.last_error == "timeout"


def test_record_success_resets_failures_and_makes_the_peer_healthy() -> None:
    table = PeerTable()
    table.upsert(_peer(trusted=True))
    for now in (10.0, 11.0, 13.0):
        table.record_failure("p", "boom", now=now)
    before = time.time()
    table.record_success("p", 0.25)
    peer = table.get("p")
    assert peer is not None
    assert (peer.healthy, peer.failures, peer.cooldown_until) == (True, 0, 0.0)
    assert peer.latency_s == 0.25 and peer.last_error is None
    assert peer.last_seen is not None and peer.last_seen >= before
    assert peer.in_rotation(13.5)
    # the next failure starts the backoff from 1 s again
    table.record_failure("p", "boom", now=20.0)
    assert peer.cooldown_until == 21.0


def test_recording_for_an_unknown_peer_is_ignored() -> None:
    table = PeerTable()
    table.record_failure("ghost", "boom", now=1.0)
    table.record_success("ghost", 0.1)
    assert "ghost" not in table and table.all() == []


@pytest.mark.parametrize(
    ("trusted", "healthy", "cooldown_until", "now", "expected"),
    [
        (True, True, 0.0, 5.0, True),
        (False, True, 0.0, 5.0, False),
        (True, False, 0.0, 5.0, False),
        (True, True, 10.0, 5.0, False),  # in cooldown
        (True, True, 10.0, 10.0, True),  # cooldown just over
    ],
)
def test_in_rotation_needs_trust_health_and_no_cooldown(
    trusted: bool, healthy: bool, cooldown_until: float, now: float, expected: bool
) -> None:
    peer = _peer(trusted=trusted, healthy=healthy, cooldown_until=cooldown_until)
    assert peer.in_rotation(now) is expected


def test_view_maps_the_peer_into_a_policy_node_view() -> None:
    models = (ModelOffer(name="qwen", context=8192, tokens_per_s=42.0),)
    peer = _peer(
        name="gpu",
        kind="vllm",
        trusted=True,
        healthy=True,
        models=models,
        queue_depth=3,
        slots=0,
        latency_s=None,
        on_battery=True,
        battery_percent=55.0,
        cooldown_until=50.0,
    )
    expected = NodeView(
        name="gpu",
        kind="vllm",
        models=models,
        trusted=True,
        healthy=True,
        queue_depth=3,
        slots=1,
        latency_s=0.0,
        on_battery=True,
        battery_percent=55.0,
    )
    assert peer.view(now=60.0) == expected
    # while in cooldown the same peer looks unhealthy to the policy
    assert peer.view(now=40.0).healthy is False
    peer.slots, peer.latency_s = 4, 0.012
    view = peer.view(now=60.0)
    assert (view.slots, view.latency_s) == (4, 0.012)


def test_table_views_and_all_are_sorted_by_name() -> None:
    table = PeerTable()
    for name in ("zeta", "alpha", "mid"):
        table.upsert(_peer(name=name, url=f"http://{name}:1"))
    assert [p.name for p in table.all()] == ["alpha", "mid", "zeta"]
    assert [v.name for v in table.views(0.0)] == ["alpha", "mid", "zeta"]


def test_upsert_of_the_same_peer_keeps_trust_and_health() -> None:
    table = PeerTable()
    models = (ModelOffer(name="m"),)
    first = table.upsert(_peer(kind="vllm", node_id="n1", api_key_env="OLD", strength=1.0))
    first.trusted, first.trust_note, first.healthy, first.models = True, "signed", True, models
    again = _peer(
        kind="vllm",
        node_id="n1",
        api_key_env="NEW",
        strength=7.0,
        static_tags=("complex",),
        signature_ok=True,
    )
    kept = table.upsert(again)
    assert kept is table.get("p")
    assert (kept.trusted, kept.trust_note, kept.healthy, kept.models) == (
        True,
        "signed",
        True,
        models,
    )
    # what the announcement/config says is refreshed
    assert (kept.api_key_env, kept.strength, kept.static_tags, kept.signature_ok) == (
        "NEW",
        7.0,
        ("complex",),
        True,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"url": "http://10.0.0.10:11435"},
        {"node_id": "n2"},
        {"kind": "openai"},
    ],
)
def test_upsert_with_another_address_or_identity_replaces_the_record(
    change: dict[str, str],
) -> None:
    table = PeerTable()
    old = table.upsert(_peer(node_id="n1"))
    old.trusted, old.healthy = True, True
    fields: dict[str, Any] = {"node_id": "n1", **change}
    new = _peer(**fields)
    stored = table.upsert(new)
    assert stored is new and table.get("p") is new
    assert not stored.trusted and not stored.healthy  # it must prove itself again


def test_offers_from_node_info_skips_malformed_entries() -> None:
    info = {
        "models": [
            {
                "name": "smollm",
                "sha256": "ab" * 32,
                "aliases": ["small"],
                "tags": ["simple"],
                "context": 2048,
                "size_bytes": 100,
                "strength": 0.1,
                "tokens_per_s": 80.0,
                "prefill_tokens_per_s": 900.0,
                "loaded": True,
            },
            "not a dict",
            {"name": 42},
            {"sha256": "no name"},
            None,
            {"name": "bare"},
        ]
    }
    offers = offers_from_node_info(info)
    assert offers == (
        ModelOffer(
            name="smollm",
            sha256="ab" * 32,
            aliases=("small",),
            tags=("simple",),
            context=2048,
            size_bytes=100,
            strength=0.1,
            tokens_per_s=80.0,
            prefill_tokens_per_s=900.0,
            loaded=True,
        ),
        ModelOffer(name="bare"),
    )


@pytest.mark.parametrize("info", [{}, {"models": None}, {"models": []}])
def test_offers_from_node_info_without_models_is_empty(info: dict[str, object]) -> None:
    assert offers_from_node_info(info) == ()


def test_offers_from_models_reads_vllm_context_and_applies_tags_and_strength() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "qwen2.5-7b", "object": "model", "max_model_len": 32768},
            {"id": "gpt-x", "object": "model"},  # plain OpenAI: no context known
            {"id": "odd", "max_model_len": "big"},  # not an int: unknown, not a crash
            {"object": "model"},  # no id: skipped
            "junk",
        ],
    }
    offers = offers_from_models(listing, ("complex",), 7.0)
    assert [(o.name, o.context) for o in offers] == [
        ("qwen2.5-7b", 32768),
        ("gpt-x", None),
        ("odd", None),
    ]
    assert all(o.tags == ("complex",) and o.strength == 7.0 and o.loaded for o in offers)
    assert offers_from_models({"data": None}, (), None) == ()


def test_describe_reports_unknown_healthy_and_cooldown() -> None:
    table = PeerTable()
    peer = table.upsert(_peer(trusted=True))
    described = peer.describe(now=10.0)
    assert (described["health"], described["in_rotation"]) == ("unknown", False)

    table.record_success("p", 0.0123)
    described = peer.describe(now=10.0)
    assert (described["health"], described["in_rotation"]) == ("healthy", True)
    assert described["latency_ms"] == 12.3

    table.record_failure("p", "refused", now=10.0)
    described = peer.describe(now=10.25)
    assert described["health"] == "cooldown"
    assert described["in_rotation"] is False
    assert described["cooldown_s"] == 0.75
    assert (described["failures"], described["last_error"]) == (1, "refused")
    # the cooldown has run out, but without a successful check it is still no "healthy"
    assert peer.describe(now=20.0)["cooldown_s"] == 0.0
    assert peer.describe(now=20.0)["health"] == "cooldown"


# ---------------------------------------------------------------------------------------
# forward.py: sse_events
# ---------------------------------------------------------------------------------------


async def _aiter(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _events(parts: list[bytes]) -> list[tuple[bytes, bytes | None]]:
    return [event async for event in sse_events(_aiter(parts))]


STREAM_LF = (
    b'data: {"a": 1}\n\n: keep-alive\n\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n'
)
EXPECTED_LF = [
    (b'data: {"a": 1}\n\n', b'{"a": 1}'),
    (b": keep-alive\n\n", None),
    (b"event: x\ndata: line1\ndata: line2\n\n", b"line1\nline2"),
    (b"data: [DONE]\n\n", b"[DONE]"),
]


async def test_sse_events_from_one_chunk() -> None:
    assert await _events([STREAM_LF]) == EXPECTED_LF


async def test_sse_events_split_across_chunks_at_every_position() -> None:
    for cut in range(1, len(STREAM_LF)):
        parts = [STREAM_LF[:cut], STREAM_LF[cut:]]
        assert await _events(parts) == EXPECTED_LF, cut


async def test_sse_events_one_byte_at_a_time() -> None:
    parts = [STREAM_LF[i : i + 1] for i in range(len(STREAM_LF))]
    events = await _events(parts)
    assert events == EXPECTED_LF
    assert b"".join(raw for raw, _ in events) == STREAM_LF


async def test_sse_events_with_crlf_separators() -> None:
    stream = b'data: {"b": 2}\r\n\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\r\n\r\n'
    expected = [
        (b'data: {"b": 2}\r\n\r\n', b'{"b": 2}'),
        (b"data: one\r\ndata: two\r\n\r\n", b"one\ntwo"),
        (b"data: [DONE]\r\n\r\n", b"[DONE]"),
    ]
    assert await _events([stream]) == expected
    for cut in range(1, len(stream)):
        assert await _events([stream[:cut], stream[cut:]]) == expected, cut


async def test_sse_events_with_mixed_separators_keeps_order_and_bytes() -> None:
    stream = b"data: a\r\n\r\ndata: b\n\ndata: c\r\n\r\n"
    events = await _events([stream])
    assert [data for _, data in events] == [b"a", b"b", b"c"]
    assert b"".join(raw for raw, _ in events) == stream


async def test_sse_events_raw_parts_concatenate_to_the_input() -> None:
    stream = b'data: {"x": "\xc3\xa9"}\n\n\n\nid: 7\ndata:nospace\n\ndata: [DONE]\n\n'
    chunks = [stream[i : i + 5] for i in range(0, len(stream), 5)]
    events = await _events(chunks)
    assert b"".join(raw for raw, _ in events) == stream
    assert [d for _, d in events if d is not None] == [
        b'{"x": "\xc3\xa9"}',
        b"nospace",
        b"[DONE]",
    ]


async def test_sse_events_trailing_event_without_blank_line_is_still_yielded() -> None:
    events = await _events([b"data: first\n\n", b"data: last"])
    assert events == [(b"data: first\n\n", b"first"), (b"data: last", b"last")]


async def test_sse_events_of_an_empty_stream() -> None:
    assert await _events([]) == []
    assert await _events([b"", b""]) == []


async def test_sse_events_stop_consumer_at_done() -> None:
    """What remote.py does: read data payloads up to [DONE]."""
    payloads = []
    async for _, data in sse_events(_aiter([b"data: 1\n\ndata: 2\n", b"\ndata: [DONE]\n\n"])):
        if data == b"[DONE]":
            break
        payloads.append(data)
    assert payloads == [b"1", b"2"]


# ---------------------------------------------------------------------------------------
# forward.py: Forwarder against a real local HTTP server
# ---------------------------------------------------------------------------------------

STREAM_CHUNKS = (b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n")
BAD_REQUEST = {
    "error": {"message": "model 'nope' not found", "type": "invalid_request_error", "code": None}
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "body": (await request.body()).decode(),
            "cluster": request.headers.get(CLUSTER_HEADER),
            "authorization": request.headers.get("authorization"),
            "forwarded_by": request.headers.get("x-pc-forwarded-by"),
        }
    )


async def _bad(request: Request) -> JSONResponse:
    return JSONResponse(BAD_REQUEST, status_code=400)


async def _busy(request: Request) -> JSONResponse:
    return JSONResponse({"detail": "queue full"}, status_code=503)


async def _boom(request: Request) -> Response:
    return PlainTextResponse("Internal Server Error", status_code=500)


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(1.0)
    return JSONResponse({})


async def _stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for chunk in STREAM_CHUNKS:
            yield chunk
            await asyncio.sleep(0.01)  # separate writes on the wire

    return StreamingResponse(body(), media_type="text/event-stream")


async def _stream_dies(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.01)
        raise RuntimeError("the model crashed before its first token")
        yield b""  # unreachable; makes this an async generator

    return StreamingResponse(body(), media_type="text/event-stream")


class _Server:
    def __init__(self) -> None:
        app = Starlette(
            routes=[
                Route("/echo", _echo, methods=["GET", "POST"]),
                Route("/bad", _bad, methods=["GET", "POST"]),
                Route("/busy", _busy, methods=["GET", "POST"]),
                Route("/boom", _boom, methods=["GET", "POST"]),
                Route("/slow", _slow, methods=["GET"]),
                Route("/stream", _stream, methods=["POST"]),
                Route("/stream-dies", _stream_dies, methods=["POST"]),
            ]
        )
        port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.server.run, name="routing-units-server")

    def __enter__(self) -> _Server:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    with _Server() as running:
        yield running


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fw = Forwarder(cluster_key=None, node_id="node-a")
    try:
        yield fw
    finally:
        await fw.close()


def _openai_peer(url: str, **kw: Any) -> Peer:
    return Peer(name="p", url=url, kind="openai", source="static", trusted=True, **kw)


async def test_request_200_is_a_peer_answer(server: _Server, forwarder: Forwarder) -> None:
    answer = await forwarder.request(
        _openai_peer(server.url), "POST", "/echo", json_body={"model": "m"}
    )
    assert isinstance(answer, PeerAnswer)
    assert answer.status == 200
    echoed = answer.json()
    assert (echoed["method"], echoed["path"]) == ("POST", "/echo")
    assert echoed["body"].replace(" ", "") == '{"model":"m"}'
    assert echoed["forwarded_by"] == "node-a"
    assert echoed["cluster"] is None and echoed["authorization"] is None
    assert answer.sent_cluster_header is None
    assert answer.seconds > 0
    assert answer.headers["content-type"] == "application/json"


async def test_request_400_is_rejected_with_the_openai_error_body(
    server: _Server, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerRejected) as caught:
        await forwarder.request(_openai_peer(server.url), "POST", "/bad", json_body={})
    assert caught.value.status == 400
    assert caught.value.body == BAD_REQUEST
    assert caught.value.peer == "p"
    assert "model 'nope' not found" in str(caught.value)


@pytest.mark.parametrize(("path", "detail"), [("/busy", "queue full"), ("/boom", "Internal")])
async def test_request_5xx_is_unavailable(
    server: _Server, forwarder: Forwarder, path: str, detail: str
) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.request(_openai_peer(server.url), "GET", path)
    assert not isinstance(caught.value, PeerRejected)
    assert caught.value.peer == "p"
    assert "answered 5" in str(caught.value) and detail in str(caught.value)
    assert caught.value.status is not None  # it answered: not a lost connection


async def test_request_to_a_closed_port_is_unavailable(forwarder: Forwarder) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.request(_openai_peer(closed), "GET", "/v1/models")
    assert "did not answer" in str(caught.value)
    assert time.monotonic() - started < 2.0  # refused at once, no connect-timeout wait
    assert not caught.value.timed_out  # refused is a hard failure, never a forgiven slow one
    assert caught.value.status is None  # no answer at all
    assert "Timeout" not in str(caught.value)  # named as what happened, not the adapter's map


async def test_request_read_timeout_is_unavailable(server: _Server, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.request(_openai_peer(server.url), "GET", "/slow", timeout=0.1)
    assert "Timeout" in str(caught.value)
    assert caught.value.timed_out


async def test_a_lost_peer_gives_up_its_long_calls_at_once(
    server: _Server, forwarder: Forwarder
) -> None:
    peer = _openai_peer(server.url)
    other = Peer(name="q", url=server.url, kind="openai", source="static", trusted=True)
    slow = asyncio.ensure_future(
        forwarder.until_lost(peer, forwarder.request(peer, "GET", "/slow", timeout=30))
    )
    unrelated = asyncio.ensure_future(
        forwarder.until_lost(other, forwarder.request(other, "GET", "/slow", timeout=30))
    )
    await asyncio.sleep(0.2)  # both are waiting on the server
    started = time.monotonic()
    forwarder.lost("p")  # what the health checks call when p stops answering
    with pytest.raises(PeerUnavailable, match="stopped answering") as caught:
        await slow
    assert caught.value.peer == "p" and time.monotonic() - started < 1.0
    assert not unrelated.done()  # another peer's call goes on
    unrelated.cancel()
    # the next call on p waits for p again (lost is an event, not a verdict)
    answer = await forwarder.until_lost(peer, forwarder.request(peer, "GET", "/echo"))
    assert answer.status == 200


async def test_a_full_connection_pool_is_retry_later_not_the_peers_fault(
    server: _Server,
) -> None:
    """Waiting for one of our own pooled connections is not the peer failing to connect:
    it says "try again", and the peer stays blameless."""
    fw = Forwarder(cluster_key=None, connect_timeout=0.2, max_connections=1)
    peer = _openai_peer(server.url)
    try:
        holding = asyncio.ensure_future(fw.request(peer, "GET", "/slow", timeout=30))
        await asyncio.sleep(0.1)  # the one connection is in use
        with pytest.raises(Overloaded, match="connections to peers are in use") as caught:
            await fw.request(peer, "GET", "/echo")
        assert caught.value.retry_after > 0
        assert (await holding).status == 200
        assert (await fw.request(peer, "GET", "/echo")).status == 200  # free again
    finally:
        await fw.close()


def test_timeout_reading_keeps_the_quick_connect() -> None:
    fw = Forwarder(cluster_key=None, connect_timeout=2.0)
    assert fw.timeout_reading(None) == aiohttp.ClientTimeout(
        total=None, connect=2.0, sock_connect=2.0, sock_read=None
    )
    assert fw.timeout_reading(90).sock_read == 90


async def test_request_to_a_pcrt_peer_carries_a_valid_cluster_signature(server: _Server) -> None:
    fw = Forwarder(cluster_key=KEY)
    try:
        peer = Peer(name="p", url=server.url, kind="pcrt", source="static", trusted=True)
        answer = await fw.request(peer, "GET", "/echo")
    finally:
        await fw.close()
    received = answer.json()["cluster"]
    assert received is not None and received == answer.sent_cluster_header
    assert verify_request(KEY, received, "GET", "/echo", NonceCache()) is None
    # the proof a peer sends back for this exchange is checkable against what we sent
    proof = response_proof(KEY, received, answer.body)
    assert verify_proof(KEY, answer.sent_cluster_header or "", answer.body, proof)


async def test_open_stream_yields_exactly_the_servers_bytes(
    server: _Server, forwarder: Forwarder
) -> None:
    stream = await forwarder.open_stream(_openai_peer(server.url), "/stream", {"stream": True})
    assert isinstance(stream, ForwardedStream)
    assert stream.status == 200
    assert stream.media_type.startswith("text/event-stream")
    received = [chunk async for chunk in stream]
    assert b"".join(received) == b"".join(STREAM_CHUNKS)
    assert received[0]  # the first chunk was read before open_stream returned
    assert stream.closed


async def test_open_stream_through_sse_events(server: _Server, forwarder: Forwarder) -> None:
    stream = await forwarder.open_stream(_openai_peer(server.url), "/stream", {})
    payloads = [data async for _, data in sse_events(aiter(stream))]
    assert payloads == [b'{"n": 1}', b'{"n": 2}', b"[DONE]"]


async def test_open_stream_fails_when_the_peer_dies_before_the_first_chunk(
    server: _Server, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.open_stream(_openai_peer(server.url), "/stream-dies", {})
    assert caught.value.peer == "p" and not caught.value.timed_out
    # and the forwarder is still usable afterwards
    answer = await forwarder.request(_openai_peer(server.url), "GET", "/echo")
    assert answer.status == 200


async def test_open_stream_error_statuses(server: _Server, forwarder: Forwarder) -> None:
    with pytest.raises(PeerRejected) as rejected:
        await forwarder.open_stream(_openai_peer(server.url), "/bad", {})
    assert (rejected.value.status, rejected.value.body) == (400, BAD_REQUEST)
    with pytest.raises(PeerUnavailable) as unavailable:
        await forwarder.open_stream(_openai_peer(server.url), "/busy", {})
    assert not isinstance(unavailable.value, PeerRejected)
    assert "queue full" in str(unavailable.value)


async def test_open_stream_to_a_closed_port_is_unavailable(forwarder: Forwarder) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.open_stream(_openai_peer(closed), "/stream", {})
    assert not caught.value.timed_out


# ---------------------------------------------------------------------------------------
# forward.py: headers_for (no network)
# ---------------------------------------------------------------------------------------


async def test_headers_for_a_pcrt_peer_sign_with_the_cluster_key() -> None:
    fw = Forwarder(cluster_key=KEY, node_id="edge-1")
    unsigned = Forwarder(cluster_key=None)
    try:
        peer = Peer(name="p", url="http://x:1", kind="pcrt", source="mdns", api_key_env="K")
        headers = fw.headers_for(peer, "post", "/v1/dag/run")
        assert headers["X-PC-Forwarded-By"] == "edge-1"
        assert "Authorization" not in headers  # a pcrt peer is never sent a bearer key
        signed = headers[CLUSTER_HEADER]
        assert verify_request(KEY, signed, "POST", "/v1/dag/run", NonceCache()) is None
        assert verify_request(KEY, signed, "POST", "/v1/other", NonceCache()) is not None
        assert unsigned.headers_for(peer, "GET", "/x") == {"X-PC-Forwarded-By": "pcrt"}
    finally:
        await fw.close()
        await unsigned.close()


async def test_headers_for_an_openai_peer_send_its_bearer_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTING_UNITS_KEY", "sk-secret")
    monkeypatch.delenv("ROUTING_UNITS_UNSET", raising=False)
    fw = Forwarder(cluster_key=KEY)
    try:
        with_key = _openai_peer("http://x:1", api_key_env="ROUTING_UNITS_KEY")
        headers = fw.headers_for(with_key, "POST", "/v1/chat/completions")
        assert headers["Authorization"] == "Bearer sk-secret"
        assert CLUSTER_HEADER not in headers  # the cluster key never goes to a foreign server
        unset = _openai_peer("http://x:1", api_key_env="ROUTING_UNITS_UNSET")
        assert "Authorization" not in fw.headers_for(unset, "POST", "/v1/chat/completions")
        assert "Authorization" not in fw.headers_for(_openai_peer("http://x:1"), "GET", "/")
    finally:
        await fw.close()


async def test_bearer_key_reaches_the_server(
    server: _Server, forwarder: Forwarder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTING_UNITS_KEY", "sk-wire")
    peer = _openai_peer(server.url, api_key_env="ROUTING_UNITS_KEY")
    answer = await forwarder.request(peer, "GET", "/echo", headers={"X-Extra": "1"})
    assert answer.json()["authorization"] == "Bearer sk-wire"


# ---------------------------------------------------------------------------------------
# runtime/settings.py: the [peers] section
# ---------------------------------------------------------------------------------------

PEERS_TOML = """
[server]
port = 12001

[peers]
lan = true
interfaces = ["192.168.1.20", "10.0.0.2"]
cluster_key_env = "ROUTING_UNITS_CLUSTER"

[[peers.static]]
name = "gpu-box"
url = "http://10.0.0.5:8000"
kind = "vllm"
api_key_env = "GPU_BOX_KEY"
models = ["qwen2.5-7b-instruct"]
tags = ["complex"]
strength = 7

[[peers.static]]
name = "cloud"
url = "https://api.example.com/v1"
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_parses_peers_and_static_peers(tmp_path: Path) -> None:
    settings = ServerSettings.load(_config(tmp_path, PEERS_TOML))
    assert settings.port == 12001
    peers = settings.peers
    assert isinstance(peers, PeerSettings)
    assert peers.lan is True
    assert peers.interfaces == ["192.168.1.20", "10.0.0.2"]
    assert peers.cluster_key_env == "ROUTING_UNITS_CLUSTER"
    assert peers.static == (
        StaticPeer(
            name="gpu-box",
            url="http://10.0.0.5:8000",
            kind="vllm",
            api_key_env="GPU_BOX_KEY",
            models=("qwen2.5-7b-instruct",),
            tags=("complex",),
            strength=7.0,
        ),
        StaticPeer(name="cloud", url="https://api.example.com/v1"),
    )
    assert peers.static[1].kind == "openai"  # the default for a static peer


def test_load_without_peers_section_has_defaults(tmp_path: Path) -> None:
    peers = ServerSettings.load(_config(tmp_path, "[server]\nport = 12002\n")).peers
    assert (peers.lan, peers.interfaces, peers.static) == (False, "all", ())


def test_unknown_key_in_peers_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = _config(tmp_path, "[peers]\nlan = true\nclustr_key_env = 'X'\n")
    with pytest.raises(ConfigError) as caught:
        ServerSettings.load(path)
    message = str(caught.value)
    assert "peers.clustr_key_env" in message and "unknown key" in message
    assert str(path) in message


def test_static_peer_with_a_bad_url_is_a_config_error_naming_it(tmp_path: Path) -> None:
    text = "[[peers.static]]\nname = 'ftp-box'\nurl = 'ftp://x'\n"
    with pytest.raises(ConfigError) as caught:
        ServerSettings.load(_config(tmp_path, text))
    assert "peers.static.0.url" in str(caught.value)


def test_unknown_key_in_a_static_peer_is_a_config_error(tmp_path: Path) -> None:
    text = "[[peers.static]]\nname = 'a'\nurl = 'http://a:1'\napi_key = 'sk-in-config'\n"
    with pytest.raises(ConfigError) as caught:
        ServerSettings.load(_config(tmp_path, text))
    assert "peers.static.0.api_key: unknown key" in str(caught.value)


def test_resolved_cluster_key_reads_the_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    peers = PeerSettings(cluster_key_env="ROUTING_UNITS_CLUSTER")
    monkeypatch.delenv("ROUTING_UNITS_CLUSTER", raising=False)
    assert peers.resolved_cluster_key() is None
    monkeypatch.setenv("ROUTING_UNITS_CLUSTER", "")
    assert peers.resolved_cluster_key() is None  # empty means unset
    monkeypatch.setenv("ROUTING_UNITS_CLUSTER", "s3cret")
    assert peers.resolved_cluster_key() == "s3cret"
    # a key in the config wins over the environment
    explicit = PeerSettings(cluster_key="from-config", cluster_key_env="ROUTING_UNITS_CLUSTER")
    assert explicit.resolved_cluster_key() == "from-config"


def test_resolved_cluster_key_from_a_loaded_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTING_UNITS_CLUSTER", "loaded-key")
    settings = ServerSettings.load(_config(tmp_path, PEERS_TOML))
    assert settings.peers.resolved_cluster_key() == "loaded-key"


# ---------------------------------------------------------------------------------------
# health.py (through the coordinator): what a failed health check does
# ---------------------------------------------------------------------------------------


async def test_two_slow_checks_are_forgiven_a_third_takes_the_peer_out() -> None:
    from pcrt.routing.coordinator import Coordinator
    from pcrt.routing.policy import NodeView

    coordinator = Coordinator(
        PeerSettings(),
        node_id="n",
        node_name="n",
        api_port=1,
        announce_address="127.0.0.1",
        local_view=lambda: NodeView(name="local", kind="local", models=()),
        local_models=list,
    )
    try:
        busy = coordinator.table.upsert(_peer(name="busy", trusted=True, healthy=True))
        for _ in range(2):
            coordinator.health.probe_failed(busy, "ReadTimeout", slow=True)
            assert busy.in_rotation(time.monotonic()) and busy.next_check == 0.0
        coordinator.health.probe_failed(busy, "ReadTimeout", slow=True)
        assert not busy.in_rotation(time.monotonic()) and busy.failures == 1
        dead = coordinator.table.upsert(_peer(name="dead", trusted=True, healthy=True))
        coordinator.health.probe_failed(dead, "ConnectError")  # refused: out at once
        assert not dead.in_rotation(time.monotonic())
        gone = coordinator.table.upsert(_peer(name="gone", trusted=True, healthy=True))
        gone.goodbye = True  # it said goodbye and then did not answer: removed
        coordinator.health.probe_failed(gone, "ConnectError")
        assert coordinator.table.get("gone") is None
        # one failed forward (a broken stream, a malformed answer) takes a peer out of
        # rotation but leaves its other long calls running; a failed check cancels them
        flaky = coordinator.table.upsert(_peer(name="flaky", trusted=True, healthy=True))
        long_call = asyncio.ensure_future(
            coordinator.forwarder.until_lost(flaky, asyncio.sleep(30))
        )
        await asyncio.sleep(0)
        coordinator.report_failure(PeerUnavailable("stream broke", peer="flaky"))
        await asyncio.sleep(0.05)
        assert not flaky.in_rotation(time.monotonic()) and not long_call.done()
        coordinator.health.probe_failed(flaky, "ConnectError")
        with pytest.raises(PeerUnavailable, match="stopped answering"):
            await long_call
    finally:
        await coordinator.forwarder.close()
        await coordinator.prober.close()


async def test_a_static_peer_with_configured_models_needs_no_model_list(server: _Server) -> None:
    """A configured cloud endpoint may have no /v1/models: its models come from config and
    any answer short of a server error keeps it up; without configured models it is down."""
    from pcrt.routing.coordinator import Coordinator
    from pcrt.routing.policy import NodeView

    listed = StaticPeer(
        name="cloud", url=server.url, kind="openai", models=("big",), tags=("complex",)
    )
    unlisted = StaticPeer(name="bare", url=server.url, kind="openai")
    coordinator = Coordinator(
        PeerSettings(static=(listed, unlisted)),
        node_id="n",
        node_name="n",
        api_port=1,
        announce_address="127.0.0.1",
        local_view=lambda: NodeView(name="local", kind="local", models=()),
        local_models=list,
    )
    try:
        await coordinator.start()
        for name in ("cloud", "bare"):
            peer = coordinator.table.get(name)
            assert peer is not None
            await coordinator.health.probe(peer)
        now = time.monotonic()
        cloud, bare = coordinator.table.get("cloud"), coordinator.table.get("bare")
        assert cloud is not None and bare is not None
        assert cloud.in_rotation(now) and [m.name for m in cloud.models] == ["big"]
        assert cloud.models[0].tags == ("complex",)
        assert not bare.in_rotation(now) and bare.failures >= 1  # the health loop asks too
    finally:
        await coordinator.close()


async def test_sightings_of_another_protocol_or_over_a_static_peer_are_ignored() -> None:
    from pcrt.routing.coordinator import Coordinator
    from pcrt.routing.discovery import SERVICE_TYPE, Sighting
    from pcrt.routing.policy import NodeView

    static = StaticPeer(name="gpu-box", url="http://10.0.0.5:8000", kind="vllm")
    coordinator = Coordinator(
        PeerSettings(static=(static,)),
        node_id="n",
        node_name="n",
        api_port=1,
        announce_address="127.0.0.1",
        local_view=lambda: NodeView(name="local", kind="local", models=()),
        local_models=list,
    )
    try:
        # as start() would put it
        coordinator.table.upsert(Peer(name="gpu-box", url=static.url, kind="vllm", source="static"))
        future = Sighting(f"future.{SERVICE_TYPE}", ("127.0.0.1",), 9, {"proto": "2", "id": "x"})
        coordinator._on_sighting("added", future)
        assert coordinator.table.get("future") is None
        spoof = Sighting(f"gpu-box.{SERVICE_TYPE}", ("127.0.0.1",), 9, {"proto": "1"})
        coordinator._on_sighting("added", spoof)
        coordinator._on_sighting("removed", spoof)
        box = coordinator.table.get("gpu-box")
        assert box is not None and box.url == static.url and box.source == "static"
    finally:
        await coordinator.forwarder.close()
        await coordinator.prober.close()


# ---------------------------------------------------------------------------------------
# statekey.py and migrate.py: which states a peer would load; a lost answer asked again
# ---------------------------------------------------------------------------------------

MODEL_SHA = "cd" * 32
HERE_KEY = CompatKey(model_sha256=MODEL_SHA, type_k="f16", type_v="f16", flash_attn=False)


def test_a_loaded_engine_key_takes_the_states_it_made() -> None:
    assert key_mismatches(HERE_KEY, EngineKey.of(HERE_KEY, parallel=4)) == []
    assert key_mismatches(HERE_KEY, EngineKey()) == []  # nothing reported: nothing to refuse


def test_key_mismatches_name_every_differing_field_state_first() -> None:
    there = EngineKey(
        type_k="q8_0", type_v="q8_0", flash_attn=True, llama_cpp_version="0.0.1", format_version=2
    )
    assert key_mismatches(HERE_KEY, there) == [
        "K type f16 vs q8_0",
        "V type f16 vs q8_0",
        "flash attention off vs on",
        f"llama.cpp version {HERE_KEY.llama_cpp_version} vs 0.0.1",
        "state format 1 vs 2",
    ]


@pytest.mark.parametrize(
    ("state_layout", "engine", "problem"),
    [
        ("portable", EngineKey(parallel=2), None),  # before a load: portable stays portable
        ("raw-4", EngineKey(parallel=4), None),  # raw: one stream per slot
        ("raw-4", EngineKey(parallel=2), "layout raw-4 vs raw-2"),
        ("raw-4", EngineKey(), None),  # slots unknown: not refused on a guess
        ("portable", EngineKey(layout="raw-2", parallel=2), "layout portable vs raw-2"),
    ],
)
def test_layout_is_predicted_before_a_load_from_the_slots(
    state_layout: str, engine: EngineKey, problem: str | None
) -> None:
    state = HERE_KEY.model_copy(update={"layout": state_layout})
    assert key_mismatches(state, engine) == ([problem] if problem else [])


def test_engine_key_from_info_round_trips_and_drops_badly_typed_fields() -> None:
    key = EngineKey.of(HERE_KEY, parallel=4)
    assert EngineKey.from_info(key.to_info()) == key
    bad = {
        "type_k": 8,
        "flash_attn": "yes",
        "format_version": True,
        "parallel": 2.5,
        "type_v": "q8_0",
    }
    assert EngineKey.from_info(bad) == EngineKey(type_v="q8_0")
    assert EngineKey.from_info("f16") is None and EngineKey.from_info(None) is None


def test_state_keys_from_node_info_by_model_name() -> None:
    info = {
        "models": [
            {"name": "a", "state_key": {"type_k": "q8_0"}},
            {"name": "old"},
            {"name": 3, "state_key": {}},
            "x",
        ]
    }
    assert state_keys_from_node_info(info) == {"a": EngineKey(type_k="q8_0")}


def _header(model: str = "smollm", key: CompatKey = HERE_KEY) -> StateHeader:
    return StateHeader(
        key=key, model=model, n_tokens=3, next_token=None, payload_bytes=1, payload_sha256="0" * 64
    )


def test_refusal_of_a_state_by_model_and_by_engine_key() -> None:
    offer = ModelOffer(name="smollm", sha256=MODEL_SHA)
    q8 = EngineKey(type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert refusal_of(_header(), _peer(models=())) == "the peer lacks model smollm"
    # an older peer says nothing of its engines: the sha256 decides, as it did
    assert refusal_of(_header(), _peer(models=(offer,))) is None
    refused = refusal_of(_header(), _peer(models=(offer,), state_keys={"smollm": q8}))
    assert refused == (
        "the peer's KV cache differs (here vs there): K type f16 vs q8_0, V type f16 vs q8_0, "
        "flash attention off vs on"
    )
    ok = EngineKey.of(HERE_KEY, parallel=4)
    assert refusal_of(_header(), _peer(models=(offer,), state_keys={"smollm": ok})) is None
    # the same file under two names: the state's own name decides when the peer has it
    twin = ModelOffer(name="twin", sha256=MODEL_SHA)
    keys = {"smollm": q8, "twin": ok}
    assert refusal_of(_header(), _peer(models=(offer, twin), state_keys=keys)) is not None
    assert refusal_of(_header("other"), _peer(models=(offer, twin), state_keys=keys)) is None


class _FakePeerCalls:
    """Stands in for ``Forwarder.request``: records calls; the record POST fails as told."""

    def __init__(self, post_failures: list[PeerUnavailable]) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.post_failures = post_failures

    async def __call__(self, peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        self.calls.append((method, path, kw.get("json_body") if method == "POST" else kw))
        if method == "POST" and self.post_failures:
            raise self.post_failures.pop(0)
        body = {"id": kw["json_body"]["run"]["id"], "status": "running"} if method == "POST" else {}
        return PeerAnswer(200, httpx.Headers(), json.dumps(body).encode(), None, 0.0)


PeerCall = Callable[..., Awaitable[PeerAnswer]]


class _FakeForwarder(Forwarder):
    """The coordinator's forwarder without the network: each request goes to ``answer``."""

    def __init__(self) -> None:
        super().__init__(cluster_key=None)
        self.answer: PeerCall = _FakePeerCalls([])

    async def request(self, peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        return await self.answer(peer, method, path, **kw)


MigrationSetup = tuple[Coordinator, _FakeForwarder, RunStore, BlobStore]


@pytest.fixture
async def migration_setup(tmp_path: Path) -> AsyncIterator[MigrationSetup]:
    """A run with one finished node's state, and a coordinator whose only peer is "p",
    reached through a fake forwarder."""
    store = Store(tmp_path / "pcrt.db")
    runs, blobs = RunStore(store), BlobStore(store, tmp_path / "blobs")
    runs.create_run("r", "/dynamic/t", {"dag": "/dynamic/t"}, {}, [("a", "/dynamic/t/a", "llm")])
    state = KVState(HERE_KEY, [1, 2, 3], 4, b"kv" * 32, model="smollm").to_bytes()
    runs.update_node(
        "r",
        "a",
        status="succeeded",
        state_sha256=blobs.put(state, run_id="r"),
        model="smollm",
        output="hi",
    )
    forwarder = _FakeForwarder()
    coordinator = Coordinator(
        PeerSettings(),
        node_id="n",
        node_name="here",
        api_port=1,
        announce_address="127.0.0.1",
        local_view=lambda: NodeView(name="local", kind="local", models=()),
        local_models=list,
        forwarder=forwarder,
    )
    try:
        yield coordinator, forwarder, runs, blobs
    finally:
        await coordinator.close()
        store.close()


def _lost(**kw: Any) -> PeerUnavailable:
    return PeerUnavailable("peer p did not answer POST /v1/pcrt/runs", peer="p", **kw)


async def test_migrate_leaves_a_state_the_peers_engine_would_refuse(
    migration_setup: MigrationSetup,
) -> None:
    coordinator, forwarder, runs, blobs = migration_setup
    q8 = EngineKey(type_k="q8_0", type_v="q8_0", flash_attn=True)
    coordinator.table.upsert(
        _peer(trusted=True, models=(ModelOffer("smollm", MODEL_SHA),), state_keys={"smollm": q8})
    )
    calls = _FakePeerCalls([])
    forwarder.answer = calls
    result = await migrate_run(coordinator, runs, blobs, "r", "p")
    assert result.states_sent == 0 and len(result.states_left) == 1
    assert "K type f16 vs q8_0" in result.states_left[0]
    assert [c[:2] for c in calls.calls] == [("POST", RUNS_PATH)]  # no state sent
    assert calls.calls[0][2]["nodes"][0]["state_sha256"] is None  # the peer recomputes


async def test_migrate_sends_the_record_again_when_its_answer_was_lost(
    migration_setup: MigrationSetup,
) -> None:
    coordinator, forwarder, runs, blobs = migration_setup
    coordinator.table.upsert(
        _peer(
            trusted=True,
            models=(ModelOffer("smollm", MODEL_SHA),),
            state_keys={"smollm": EngineKey.of(HERE_KEY, 4)},
        )
    )
    calls = _FakePeerCalls([_lost(timed_out=True)])
    forwarder.answer = calls
    result = await migrate_run(coordinator, runs, blobs, "r", "p")
    assert result.states_sent == 1 and result.peer_status == "running"
    sha = runs.node("r", "a").state_sha256
    # the state goes from its file, signed over its name (the peer checks the body)
    assert [c[:2] for c in calls.calls] == [
        ("PUT", f"{BLOBS_PATH}?run_id=r&sha256={sha}"),
        ("POST", RUNS_PATH),
        ("POST", RUNS_PATH),
    ]
    sent = calls.calls[0][2]
    assert sent["content"] == blobs.path_of(sha or "") and sent["content_sha256"] == sha
    assert calls.calls[1][2] == calls.calls[2][2]  # the same record, byte for byte

    # an answered error is not asked twice, and a second lost answer is the failure
    for failures, posts in (([_lost(status=503)], 1), ([_lost(), _lost()], 2)):
        calls = _FakePeerCalls(failures)
        forwarder.answer = calls
        with pytest.raises(PeerUnavailable):
            await migrate_run(coordinator, runs, blobs, "r", "p")
        assert [c[0] for c in calls.calls].count("POST") == posts

    # a 200 whose body is not JSON is no pcrt peer's answer: unavailable, not a crash
    async def html(peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        return PeerAnswer(200, httpx.Headers(), b"<html>captive portal</html>", None, 0.0)

    forwarder.answer = html
    with pytest.raises(PeerUnavailable, match="did not take run r"):
        await migrate_run(coordinator, runs, blobs, "r", "p")
    # and the record says who sent it by node id, unique where hostnames may not be
    assert calls.calls[-1][2]["origin"] == "n"


# ---------------------------------------------------------------------------------------
# battery.py and battery_watch.py: a low battery moves the runs once per discharge
# ---------------------------------------------------------------------------------------


def _battery(percent: float, plugged_in: bool | None = False) -> Battery:
    return Battery(percent=percent, plugged_in=plugged_in, seconds_left=None)


def test_low_battery_triggers_once_per_discharge() -> None:
    trigger = LowBattery(threshold=30.0)
    readings = [
        (None, False),  # no battery at all
        (_battery(80), False),
        (_battery(29), True),  # crossed on battery: move
        (_battery(25), False),  # still low: once only
        (_battery(10), False),
        (_battery(10, plugged_in=None), False),  # power state unknown: nothing changes
        (_battery(12, plugged_in=True), False),  # plugged in: re-armed, not triggered
        (_battery(12), True),  # unplugged again below the threshold: move again
        (_battery(30), False),  # back at the threshold: re-armed
        (_battery(29.5), True),
        (_battery(5, plugged_in=None), False),
    ]
    assert [trigger.update(b) for b, _ in readings] == [want for _, want in readings]


def test_low_battery_never_triggers_when_plugged_in_or_unknown() -> None:
    trigger = LowBattery(threshold=30.0)
    assert not any(
        trigger.update(_battery(p, plugged)) for p in (50, 10, 1) for plugged in (True, None)
    )


async def test_battery_watch_moves_the_runs_once_and_outlives_a_bad_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pcrt.runtime.server import battery_watch

    readings: list[Battery | None | Exception] = [
        _battery(50),
        OSError("sensor gone"),
        _battery(20),
        _battery(19),
        _battery(18),
    ]
    moves: list[str] = []
    done = asyncio.Event()

    def read() -> Battery | None:
        reading = readings.pop(0) if readings else _battery(17)
        if not readings:
            done.set()
        if isinstance(reading, Exception):
            raise reading
        return reading

    async def move(services: Any, why: str, *, resume_unmoved: bool) -> list[str]:
        assert resume_unmoved  # the daemon keeps serving: an unmoved run goes on here
        moves.append(why)
        return ["r"]

    monkeypatch.setattr(battery_watch, "move_running_runs", move)
    services = SimpleNamespace(settings=ServerSettings(peers=PeerSettings(battery_threshold=30)))
    task = asyncio.create_task(
        battery_watch.watch_battery(cast(Services, services), read, interval=0.001)
    )
    try:
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert moves == ["on battery at 20%"]


# ---------------------------------------------------------------------------------------
# remote.py: a subgraph on a pcrt peer always has a read limit
# ---------------------------------------------------------------------------------------


async def _run_subgraph(fw: Forwarder, url: str, timeout: float | None) -> dict[str, Any]:
    """``RemoteRunner.subgraph`` on a pcrt peer at ``url``, with ``timeout`` the DAG's."""
    from pcrt.routing.policy import Candidate
    from pcrt.routing.remote import RemoteRunner

    peer = Peer(name="p", url=url, kind="pcrt", source="static", trusted=True)
    coordinator = SimpleNamespace(forwarder=fw, node_name="edge", peer=lambda name: peer)
    candidate = Candidate(node="p", kind="pcrt", model="m", est_seconds=1.0, score=1.0, why="")
    return await RemoteRunner(cast(Coordinator, coordinator)).subgraph(candidate, {}, timeout)


class _ReadLimits(Forwarder):
    """A forwarder that sends nothing: it notes each request's read limit and answers
    with no nodes."""

    def __init__(self) -> None:
        super().__init__(cluster_key=KEY)
        self.limits: list[float | None] = []

    async def request(self, peer: Peer, method: str, path: str, **kw: Any) -> Any:
        self.limits.append(kw["timeout"].sock_read)
        return SimpleNamespace(json=lambda: {"nodes": {}})


async def test_a_subgraph_reads_for_the_dag_timeout_or_the_forwarders_own_limit() -> None:
    fw = _ReadLimits()
    await _run_subgraph(fw, "http://127.0.0.1:9", None)  # no DAG timeout: the forwarder's
    await _run_subgraph(fw, "http://127.0.0.1:9", 100.0)  # the DAG's own, with a margin
    assert fw.limits == [600.0, 130.0]


async def test_a_subgraph_peer_that_goes_silent_is_given_up_on() -> None:
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # takes the request, never answers
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    fw = Forwarder(cluster_key=KEY, read_timeout=0.2)  # the limit a DAG without a timeout gets
    try:
        with pytest.raises(PeerUnavailable):
            await asyncio.wait_for(_run_subgraph(fw, f"http://127.0.0.1:{port}", None), 10)
        assert accepted.is_set()
    finally:
        await fw.close()
        listener.close()
        await listener.wait_closed()
