"""The cluster-key signatures (``routing/auth.py``): signed requests and their nonces,
response proofs, signed announcements. No network."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pcrt.routing.auth import (
    MAX_SKEW,
    NonceCache,
    announcement_signature,
    precheck_request,
    request_header,
    response_proof,
    verify_announcement,
    verify_proof,
    verify_request,
)
from pcrt.runtime.errors import Overloaded
from tests.routing_helpers import KEY

WRONG = "wrong cluster key (or a changed request)"
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
        ("v3 1700000000.000 abc - def", "malformed cluster signature"),
        ("v3 1700000000.000 abc - def ghi extra", "malformed cluster signature"),
        ("v1 1700000000.000 abc - def", "malformed cluster signature"),  # older formats
        ("v2 1700000000.000 abc - def", "malformed cluster signature"),
        ("v3 yesterday abc - def ghi", "malformed cluster signature"),
        ("v3 1700000000.000 abc - def ghi", WRONG),  # well-formed, bad MACs
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
    version, ts, nonce, authority, head, _ = real.split(" ")
    for forged in (
        f"{version} {ts} {nonce} {authority} {head} {'0' * 64}",  # the body's MAC
        f"{version} {ts} {nonce} {authority} {'0' * 64} {'0' * 64}",  # both
    ):
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


def test_a_full_nonce_cache_refuses_new_requests_rather_than_forget_one() -> None:
    """Forgetting the oldest nonce to make room would let its request be replayed: a full
    cache refuses new requests (busy: retry once the oldest leaves the window)."""
    cache = NonceCache(limit=3)
    for i, nonce in enumerate("abc"):
        assert cache.first_use(nonce, T0 + i, stamped=T0 + i)
    with pytest.raises(Overloaded) as refused:
        cache.first_use("d", T0 + 3, stamped=T0 + 3)
    # "a" leaves the window MAX_SKEW after its stamp, T0 + 60: 57 s from now
    assert refused.value.retry_after == pytest.approx(MAX_SKEW - 3)
    assert "retry in 57 s" in str(refused.value)
    assert len(cache) == 3
    for nonce in "abc":  # every one is still remembered
        assert not cache.first_use(nonce, T0 + 3, stamped=T0 + 3)
    # once "a" leaves the window there is room again, and "a" is a replay no longer
    # needed: its clock check refuses it
    assert cache.first_use("d", T0 + MAX_SKEW + 0.5, stamped=T0 + MAX_SKEW)
    assert not cache.first_use("b", T0 + MAX_SKEW + 0.5)


def test_a_captured_request_stays_refused_however_many_requests_follow() -> None:
    """Item 9 of issue 16: the cache evicted by count, so a captured signed request passed
    again after ``limit`` other signed requests within its window."""
    nonces = NonceCache(limit=100)
    captured = request_header(KEY, "POST", "/v1/pcrt/subgraphs", body=b"{}", now=T0)
    assert (
        verify_request(KEY, captured, "POST", "/v1/pcrt/subgraphs", nonces, body=b"{}", now=T0)
        is None
    )
    refusals = 0
    for i in range(150):
        other = request_header(KEY, "GET", "/v1/pcrt/node", now=T0 + i * 0.1)
        try:
            verify_request(KEY, other, "GET", "/v1/pcrt/node", nonces, now=T0 + i * 0.1)
        except Overloaded:
            refusals += 1
    assert refusals == 51  # the cache took 99 more, then said "busy"
    replayed = verify_request(
        KEY, captured, "POST", "/v1/pcrt/subgraphs", nonces, body=b"{}", now=T0 + 20
    )
    assert replayed == "replayed cluster signature"


def test_a_nonce_is_kept_until_its_stamp_leaves_the_window_and_no_longer() -> None:
    """Forgotten when the clock check alone refuses its request (MAX_SKEW after the stamp,
    wherever that puts it from receipt): never earlier, and memory is not held longer."""
    nonces = NonceCache()
    late = request_header(KEY, "GET", "/p", now=T0 - 50)  # a peer 50 s behind our clock
    early = request_header(KEY, "GET", "/p", now=T0 + 50)  # and one 50 s ahead
    assert verify_request(KEY, late, "GET", "/p", nonces, now=T0) is None
    assert verify_request(KEY, early, "GET", "/p", nonces, now=T0) is None
    replayed = "replayed cluster signature"
    # the late one is valid until T0 + 10, the early one until T0 + 110
    assert verify_request(KEY, late, "GET", "/p", nonces, now=T0 + 10) == replayed
    assert len(nonces) == 2
    nonces.first_use("x", T0 + 10.5)  # any traffic: kept as if stamped 60 s ahead
    assert len(nonces) == 2  # the late one went: its replay fails the clock check now
    assert "off this clock" in (verify_request(KEY, late, "GET", "/p", nonces, now=T0 + 11) or "")
    assert verify_request(KEY, early, "GET", "/p", nonces, now=T0 + 110) == replayed
    nonces.first_use("y", T0 + 110.5)
    assert len(nonces) == 2  # "x" and "y": the early one went too


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


def test_the_precheck_refuses_what_no_body_could_save_and_spends_no_nonce() -> None:
    """``precheck_request`` runs before the body is read: form, the MAC without the body,
    clock, destination and a nonce already spent. It leaves the nonce for the full check,
    which adds the body's MAC."""
    nonces = NonceCache()
    here = "127.0.0.1:8080"

    def ours(authority: str) -> bool:
        return authority == here

    def pre(header: str | None) -> str | None:
        return precheck_request(KEY, header, "POST", "/x", nonces, authority_ok=ours, now=T0)

    fresh = request_header(KEY, "POST", "/x", authority=here, now=T0)
    assert pre(None) == "no cluster signature"
    assert pre("v3 nonsense") == "malformed cluster signature"
    stale = request_header(KEY, "POST", "/x", authority=here, now=T0 - 2 * MAX_SKEW)
    assert "off this clock" in (pre(stale) or "")
    elsewhere = request_header(KEY, "POST", "/x", authority="10.0.0.9:8080", now=T0)
    assert pre(elsewhere) == "signed for 10.0.0.9:8080, not this node"
    forged = request_header(OTHER_KEY, "POST", "/x", authority=here, now=T0)
    assert pre(forged) == WRONG
    elsewhere_path = request_header(KEY, "POST", "/y", authority=here, now=T0)
    assert pre(elsewhere_path) == WRONG
    other_body = request_header(KEY, "POST", "/x", authority=here, body=b"{}", now=T0)
    assert pre(other_body) is None  # the body's MAC is the full check's
    assert verify_request(KEY, other_body, "POST", "/x", nonces, authority_ok=ours, now=T0) == WRONG
    assert pre(fresh) is None and pre(fresh) is None  # not spent by the precheck
    assert verify_request(KEY, fresh, "POST", "/x", nonces, authority_ok=ours, now=T0) is None
    assert pre(fresh) == "replayed cluster signature"


def test_non_ascii_mac_is_refused_not_raised() -> None:
    header = f"v3 {T0:.3f} abc - \u00e9 \u00e9"
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
