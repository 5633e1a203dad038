"""The peer table (``routing/peers.py``): cooldowns, rotation, the policy view, upserts,
and the offers read from a peer's node info or model list. No network."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pcrt.routing.peers import (
    PeerTable,
    cooldown_seconds,
    offers_from_models,
    offers_from_node_info,
)
from pcrt.routing.policy import ModelOffer, NodeView
from tests.routing_helpers import mdns_peer


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
    table.upsert(mdns_peer(failures=1024))
    table.record_failure("p", "connection refused", now=100.0)
    peer = table.get("p")
    assert peer is not None
    assert peer.cooldown_until == 130.0


def test_record_failure_takes_the_peer_out_of_rotation_with_backoff() -> None:
    table = PeerTable()
    table.upsert(mdns_peer(trusted=True))
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
    table.upsert(mdns_peer(trusted=True))
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
    peer = mdns_peer(trusted=trusted, healthy=healthy, cooldown_until=cooldown_until)
    assert peer.in_rotation(now) is expected


def test_view_maps_the_peer_into_a_policy_node_view() -> None:
    models = (ModelOffer(name="qwen", context=8192, tokens_per_s=42.0),)
    peer = mdns_peer(
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
        table.upsert(mdns_peer(name=name, url=f"http://{name}:1"))
    assert [p.name for p in table.all()] == ["alpha", "mid", "zeta"]
    assert [v.name for v in table.views(0.0)] == ["alpha", "mid", "zeta"]


def test_upsert_of_the_same_peer_keeps_trust_and_health() -> None:
    table = PeerTable()
    models = (ModelOffer(name="m"),)
    first = table.upsert(mdns_peer(kind="vllm", node_id="n1", api_key_env="OLD", strength=1.0))
    first.trusted, first.trust_note, first.healthy, first.models = True, "signed", True, models
    again = mdns_peer(
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
    old = table.upsert(mdns_peer(node_id="n1"))
    old.trusted, old.healthy = True, True
    fields: dict[str, Any] = {"node_id": "n1", **change}
    new = mdns_peer(**fields)
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
    peer = table.upsert(mdns_peer(trusted=True))
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
