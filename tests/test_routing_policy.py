"""The routing policy on synthetic node tables: every filter, every ordering rule, the
reasons a person reads, and determinism. Pure functions, so no servers and no models.

Numbers are chosen so estimates are exact: with the defaults (20 tok/s decode, 200 tok/s
prefill) ``Work(max_tokens=100)`` decodes in 5 s and 200 prompt tokens prefill in 1 s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pcrt.routing.policy import (
    Candidate,
    Decision,
    ModelOffer,
    NodeView,
    PolicySettings,
    Work,
    decide,
    estimate_seconds,
    match_model,
)

GB = 1024**3
SETTINGS = PolicySettings()


def offer(name: str = "qwen-7b", **kw: Any) -> ModelOffer:
    return ModelOffer(name=name, **kw)


def node(name: str, kind: Any = "pcrt", *models: ModelOffer, **kw: Any) -> NodeView:
    return NodeView(name=name, kind=kind, models=models or (offer(),), **kw)


def local(*models: ModelOffer, **kw: Any) -> NodeView:
    return node("laptop", "local", *models, **kw)


def speed(tps: float, name: str = "qwen-7b", **kw: Any) -> ModelOffer:
    return offer(name, tokens_per_s=tps, **kw)


def order(decision: Decision) -> list[str]:
    return [c.node for c in decision.candidates]


def rejected(decision: Decision) -> dict[str, str]:
    return dict(decision.rejected)


# -- estimate_seconds -------------------------------------------------------------------


def test_estimate_adds_latency_queue_prefill_and_decode() -> None:
    n = node("gpu", "vllm", latency_s=0.5, queue_depth=2, slots=2)
    o = offer(tokens_per_s=50.0, prefill_tokens_per_s=400.0)
    work = Work(prompt_tokens=400, max_tokens=100)
    # 0.5 latency + 2/2 * 2 s queue + 400/400 prefill + 100/50 decode
    assert estimate_seconds(n, o, work, SETTINGS) == pytest.approx(0.5 + 2.0 + 1.0 + 2.0)


def test_estimate_uses_defaults_for_unknown_or_broken_speeds() -> None:
    work = Work(prompt_tokens=200, max_tokens=100)
    n = local()
    assert estimate_seconds(n, offer(), work, SETTINGS) == pytest.approx(1.0 + 5.0)
    broken = offer(tokens_per_s=0.0, prefill_tokens_per_s=-1.0)
    assert estimate_seconds(n, broken, work, SETTINGS) == pytest.approx(6.0)
    custom = PolicySettings(default_tokens_per_s=10.0, default_prefill_tokens_per_s=100.0)
    assert estimate_seconds(n, offer(), work, custom) == pytest.approx(2.0 + 10.0)


def test_queue_wait_is_spread_over_slots() -> None:
    work = Work(max_tokens=100)
    one_slot = node("a", queue_depth=4, slots=1)
    four_slots = node("a", queue_depth=4, slots=4)
    no_slots = node("a", queue_depth=4, slots=0)  # a bad report must not divide by zero
    assert estimate_seconds(one_slot, offer(), work, SETTINGS) == pytest.approx(5.0 + 20.0)
    assert estimate_seconds(four_slots, offer(), work, SETTINGS) == pytest.approx(5.0 + 5.0)
    assert estimate_seconds(no_slots, offer(), work, SETTINGS) == pytest.approx(25.0)


# -- match_model ------------------------------------------------------------------------


def test_match_by_name_then_alias() -> None:
    a = offer("qwen2.5-7b-instruct-q4", aliases=("qwen-7b",))
    b = offer("qwen-7b")  # named exactly what was asked: wins over the alias
    n = node("p", "pcrt", a, b)
    assert match_model(n, Work(model="qwen-7b")) is b
    assert match_model(node("p", "pcrt", a), Work(model="qwen-7b")) is a
    assert match_model(n, Work(model="qwen2.5-7b-instruct-q4")) is a
    assert match_model(n, Work(model="llama-70b")) is None


def test_several_aliases_prefer_loaded() -> None:
    cold = offer("q-a", aliases=("qwen",), strength=70.0)
    warm = offer("q-b", aliases=("qwen",), strength=7.0, loaded=True)
    assert match_model(node("p", "pcrt", cold, warm), Work(model="qwen")) is warm


def test_tag_prefers_loaded_then_strongest_then_fastest() -> None:
    weak_loaded = offer("small", tags=("complex",), strength=1.0, loaded=True)
    strong_cold = offer("big", tags=("complex",), strength=70.0)
    assert match_model(node("p", "pcrt", strong_cold, weak_loaded), Work(tag="complex")) is (
        weak_loaded
    )

    unknown = offer("mystery", tags=("complex",))  # unknown strength is the weakest
    mid = offer("mid", tags=("complex",), strength=8.0)
    strong = offer("strong", tags=("complex",), strength=14.0)
    assert match_model(node("p", "pcrt", unknown, mid, strong), Work(tag="complex")) is strong
    assert match_model(node("p", "pcrt", unknown, mid), Work(tag="complex")) is mid

    slow = offer("slow", tags=("simple",), strength=1.0, tokens_per_s=10.0)
    fast = offer("fast", tags=("simple",), strength=1.0, tokens_per_s=90.0)
    unmeasured = offer("unmeasured", tags=("simple",), strength=1.0)
    assert match_model(node("p", "pcrt", slow, unmeasured, fast), Work(tag="simple")) is fast
    assert match_model(node("p", "pcrt", unmeasured, slow), Work(tag="simple")) is slow


def test_tag_ties_are_broken_by_model_name() -> None:
    b = offer("b", tags=("simple",))
    a = offer("a", tags=("simple",))
    assert match_model(node("p", "pcrt", b, a), Work(tag="simple")) is a


def test_model_falls_back_to_tag_and_neither_takes_the_best_offer() -> None:
    small = offer("small", tags=("simple",), loaded=True)
    big = offer("big", strength=70.0)
    n = node("p", "pcrt", big, small)
    assert match_model(n, Work(model="absent", tag="simple")) is small
    assert match_model(n, Work(tag="nope")) is None
    assert match_model(n, Work()) is small  # loaded first
    assert match_model(NodeView("empty", "pcrt", ()), Work()) is None


# -- hard filters -----------------------------------------------------------------------


def test_route_hint_local_keeps_only_local() -> None:
    d = decide(Work(route="local"), local(), [node("gpu", "vllm")])
    assert order(d) == ["laptop"]
    assert d.is_local
    assert rejected(d) == {"gpu": "route hint: local only"}


def test_route_hint_peer_keeps_only_peers() -> None:
    d = decide(Work(route="peer"), local(), [node("gpu", "vllm")])
    assert order(d) == ["gpu"]
    assert not d.is_local
    assert rejected(d) == {"laptop": "route hint: peer only"}
    assert "vs local: route hint: peer only" in d.reason


def test_peer_kinds_limit_which_peers_take_a_subgraph() -> None:
    subgraph = Work(peer_kinds=frozenset({"pcrt"}), route="peer")
    d = decide(subgraph, None, [node("cloud", "openai"), node("vllm", "vllm"), node("box")])
    assert order(d) == ["box"]
    assert rejected(d)["cloud"] == "kind openai cannot take this work (allowed: pcrt)"
    assert rejected(d)["vllm"] == "kind vllm cannot take this work (allowed: pcrt)"


def test_peer_kinds_do_not_apply_to_local() -> None:
    d = decide(Work(peer_kinds=frozenset()), local(), [node("box")])
    assert order(d) == ["laptop"]
    assert rejected(d) == {"box": "kind pcrt cannot take this work (allowed: none)"}


def test_a_candidate_carries_the_tools_its_node_offers() -> None:
    """What a subgraph sent whole takes along depends on them (``offsite.peer_group``)."""
    box = node("box", tools=frozenset({"search", "pay"}), idempotent_tools=frozenset({"search"}))
    d = decide(Work(route="peer"), None, [box])
    assert d.chosen is not None and d.chosen.tools == frozenset({"search", "pay"})
    assert d.chosen.idempotent_tools == frozenset({"search"})


def test_untrusted_and_unhealthy_peers_are_rejected() -> None:
    peers = [node("stranger", trusted=False), node("flaky", healthy=False), node("ok")]
    d = decide(Work(route="peer"), None, peers)
    assert order(d) == ["ok"]
    assert rejected(d) == {
        "stranger": "untrusted: cluster key not proven",
        "flaky": "unhealthy: in cooldown",
    }


def test_trust_is_checked_before_health_and_model() -> None:
    # the first failing filter is the reason: an untrusted peer's models are not looked at
    d = decide(Work(model="absent"), None, [node("x", trusted=False, healthy=False)])
    assert rejected(d) == {"x": "untrusted: cluster key not proven"}


def test_missing_model_and_tag_reasons() -> None:
    peers = [node("box", "pcrt", offer("llama-8b", tags=("simple",)))]
    by_name = decide(Work(model="qwen-7b"), local(offer("smollm2-135m")), peers)
    assert by_name.candidates == ()
    assert rejected(by_name) == {"laptop": "no such model qwen-7b", "box": "no such model qwen-7b"}
    by_tag = decide(Work(tag="complex"), None, peers)
    assert rejected(by_tag) == {"box": "no model tagged complex"}
    both = decide(Work(model="qwen-7b", tag="complex"), None, peers)
    assert rejected(both) == {"box": "no such model qwen-7b or model tagged complex"}


def test_context_must_fit_prompt_plus_max_tokens() -> None:
    peers = [
        node("tight", "vllm", offer(context=4096)),
        node("exact", "vllm", offer(context=4100)),
        node("unknown", "vllm", offer(context=None)),
    ]
    d = decide(Work(prompt_tokens=4000, max_tokens=100, route="peer"), None, peers)
    assert sorted(order(d)) == ["exact", "unknown"]
    assert rejected(d) == {"tight": "context of qwen-7b is 4096 tokens, needs 4000 + 100"}


def test_memory_is_checked_only_for_a_local_model_not_yet_loaded() -> None:
    big = offer(size_bytes=8 * GB)
    work = Work(route="local")
    short = decide(work, local(big, available_memory=4 * GB), [])
    assert short.candidates == ()
    assert rejected(short) == {"laptop": "not enough memory: qwen-7b needs 8.0 GiB, 4.0 GiB free"}
    loaded = offer(size_bytes=8 * GB, loaded=True)
    assert decide(work, local(loaded, available_memory=4 * GB), []).is_local
    assert decide(work, local(big, available_memory=None), []).is_local
    assert decide(work, local(offer(), available_memory=1), []).is_local  # size unknown
    # a peer manages its own memory: its reported free memory is not ours to judge
    peer = node("box", "pcrt", big, available_memory=1)
    assert order(decide(Work(route="peer"), None, [peer])) == ["box"]


def test_timeout_rejects_nodes_predicted_too_slow() -> None:
    work = Work(max_tokens=180, timeout_s=5)
    slow_local = local(speed(20.0))  # 9 s
    fast_peer = node("gpu", "vllm", speed(60.0))  # 3 s
    d = decide(work, slow_local, [fast_peer])
    assert order(d) == ["gpu"]
    assert rejected(d) == {"laptop": "est. 9.0 s over the 5 s timeout"}
    assert d.reason.startswith("peer gpu: qwen-7b, est. 3.0 s vs local: est. 9.0 s over")


def test_timeout_counts_queue_and_latency() -> None:
    work = Work(max_tokens=100, timeout_s=6)  # 5 s of decode
    busy = node("busy", queue_depth=1, latency_s=0.1)  # 5 s queue + 5 s + 0.1
    far = node("far", latency_s=1.5)
    near = node("near", latency_s=0.5)
    d = decide(work, None, [busy, far, near])
    assert order(d) == ["near"]
    assert rejected(d) == {
        "busy": "est. 10.1 s over the 6 s timeout",
        "far": "est. 6.5 s over the 6 s timeout",
    }


def test_rejections_keep_local_first_then_peers_in_input_order() -> None:
    peers = [node("z", healthy=False), node("a", trusted=False)]
    d = decide(Work(model="absent"), local(), peers)
    assert [name for name, _ in d.rejected] == ["laptop", "z", "a"]


# -- ordering by complexity -------------------------------------------------------------


@pytest.mark.parametrize("complexity", [None, "low"])
def test_low_complexity_keeps_local_unless_a_peer_is_clearly_faster(complexity: Any) -> None:
    work = Work(max_tokens=100, complexity=complexity)
    here = local(speed(20.0))  # 5 s
    # 1.4x faster: not enough to leave the machine
    d = decide(work, here, [node("gpu", "vllm", speed(28.0))])
    assert order(d) == ["laptop", "gpu"]
    assert d.is_local
    assert d.reason == (
        "local: qwen-7b, est. 5.0 s vs peer gpu: qwen-7b, est. 3.6 s; "
        "local preferred unless a peer is 1.5x faster"
    )
    # 1.6x faster: the peer wins
    d = decide(work, here, [node("gpu", "vllm", speed(32.0))])
    assert order(d) == ["gpu", "laptop"]
    assert not d.is_local
    assert d.candidates[0].score == pytest.approx(3.125 * 1.5)
    assert d.candidates[1].score == pytest.approx(5.0)


def test_low_complexity_tie_at_exactly_the_preference_goes_to_local() -> None:
    here = local(speed(30.0))  # 100/30
    peer = node("gpu", "vllm", speed(45.0))  # 100/45, times 1.5 = 100/30
    d = decide(Work(max_tokens=100, complexity="low"), here, [peer])
    assert order(d) == ["laptop", "gpu"]


def test_local_preference_is_a_setting() -> None:
    work = Work(max_tokens=100)
    here = local(speed(20.0))
    peer = node("gpu", "vllm", speed(28.0))
    eager = PolicySettings(local_preference=1.0)
    assert order(decide(work, here, [peer], eager)) == ["gpu", "laptop"]
    assert "unless a peer is 1x faster" in decide(work, here, [peer], eager).reason


def test_medium_complexity_takes_the_fastest() -> None:
    work = Work(max_tokens=100, complexity="medium")
    here = local(speed(20.0))  # 5 s
    peers = [node("a", "vllm", speed(21.0)), node("b", "pcrt", speed(10.0))]
    d = decide(work, here, peers)
    assert order(d) == ["a", "b", "laptop"]  # chosen peer, other peers, local last
    assert [c.score for c in d.candidates] == pytest.approx([100 / 21, 10.0, 5.0])
    assert "local preferred" not in d.reason


def test_medium_complexity_picks_local_when_it_is_fastest() -> None:
    work = Work(max_tokens=100, complexity="medium")
    d = decide(work, local(speed(50.0)), [node("a", "vllm", speed(21.0)), node("b")])
    assert order(d) == ["laptop", "a", "b"]
    assert d.reason == "local: qwen-7b, est. 2.0 s vs peer a: qwen-7b, est. 4.8 s"


def test_high_complexity_goes_to_the_strongest_peer_and_local_last() -> None:
    work = Work(max_tokens=100, complexity="high")
    here = local(speed(200.0, strength=70.0))  # fastest and strongest, still last
    peers = [
        node("fast-small", "vllm", speed(100.0, "qwen-7b", strength=7.0)),
        node("slow-big", "vllm", speed(10.0, "qwen-72b", strength=72.0)),
        node("unknown", "openai", speed(500.0, "gpt-x")),
        node("mid", "pcrt", speed(30.0, "qwen-14b", strength=14.0)),
    ]
    d = decide(work, here, peers)
    assert order(d) == ["slow-big", "mid", "fast-small", "unknown", "laptop"]
    assert [c.model for c in d.candidates] == [
        "qwen-72b",
        "qwen-14b",
        "qwen-7b",
        "gpt-x",
        "qwen-7b",
    ]
    assert d.reason == (
        "peer slow-big: qwen-72b, est. 10.0 s vs local: qwen-7b, est. 0.5 s; "
        "complexity high: strongest peer first"
    )


def test_high_complexity_equal_strength_goes_by_estimate_then_name() -> None:
    work = Work(max_tokens=100, complexity="high")
    peers = [
        node("c", "vllm", speed(20.0, strength=70.0)),
        node("b", "vllm", speed(40.0, strength=70.0)),
        node("a", "vllm", speed(20.0, strength=70.0)),
    ]
    assert order(decide(work, None, peers)) == ["b", "a", "c"]


def test_high_complexity_falls_back_to_local_when_no_peer_qualifies() -> None:
    work = Work(max_tokens=100, complexity="high")
    d = decide(work, local(), [node("gpu", "vllm", healthy=False)])
    assert order(d) == ["laptop"]
    assert d.reason == (
        "local: qwen-7b, est. 5.0 s vs no peer qualified (gpu: unhealthy: in cooldown)"
    )


# -- battery ----------------------------------------------------------------------------


def test_low_battery_hands_work_to_a_slower_peer() -> None:
    work = Work(max_tokens=100)
    here = local(speed(20.0), on_battery=True, battery_percent=12.0)  # 5 s, x4 = 20
    peer = node("desk", "pcrt", speed(10.0))  # 10 s, x1.5 = 15
    d = decide(work, here, [peer])
    assert order(d) == ["desk", "laptop"]
    assert d.candidates[1].score == pytest.approx(20.0)
    assert d.candidates[1].est_seconds == pytest.approx(5.0)  # the estimate itself is honest
    assert "on battery at 12%" in d.candidates[1].why
    assert d.reason == (
        "peer desk: qwen-7b, est. 10.0 s vs local: qwen-7b, est. 5.0 s; "
        "local on battery at 12%, cost x4; local preferred unless a peer is 1.5x faster"
    )


def test_low_battery_does_not_override_a_much_slower_peer() -> None:
    here = local(speed(20.0), on_battery=True, battery_percent=12.0)  # 20 after penalty
    peer = node("desk", "pcrt", speed(4.0))  # 25 s
    d = decide(Work(max_tokens=100), here, [peer])
    assert order(d) == ["laptop", "desk"]
    assert "local on battery at 12%" in d.reason


@pytest.mark.parametrize(
    ("on_battery", "percent"), [(True, 30.0), (True, 80.0), (True, None), (False, 5.0)]
)
def test_battery_penalty_only_on_battery_below_threshold(
    on_battery: bool, percent: float | None
) -> None:
    here = local(speed(20.0), on_battery=on_battery, battery_percent=percent)
    peer = node("desk", "pcrt", speed(10.0))
    d = decide(Work(max_tokens=100), here, [peer])
    assert order(d) == ["laptop", "desk"]
    assert d.candidates[0].score == pytest.approx(5.0)
    assert "battery" not in d.reason


def test_battery_threshold_and_penalty_are_settings() -> None:
    here = local(speed(20.0), on_battery=True, battery_percent=45.0)
    peer = node("desk", "pcrt", speed(10.0))
    settings = PolicySettings(battery_threshold=50.0, battery_penalty=2.0)
    d = decide(Work(max_tokens=100, complexity="medium"), here, [peer], settings)
    assert order(d) == ["laptop", "desk"]  # 10 vs 10: local wins the tie
    assert d.candidates[0].score == pytest.approx(10.0)
    assert "cost x2" in d.reason


# -- fallbacks, ties, determinism -------------------------------------------------------


def test_chosen_peer_falls_back_to_other_peers_before_local() -> None:
    # local (6 s) would beat peer "b" (9 s x 1.5) on score, but a chosen peer means local was
    # judged worse: fallbacks try the other peers first and local last
    work = Work(max_tokens=100, complexity="low")
    here = local(speed(100 / 6))
    peers = [node("b", "vllm", speed(100 / 9)), node("a", "vllm", speed(100 / 3))]
    d = decide(work, here, peers)
    assert order(d) == ["a", "b", "laptop"]
    assert d.candidates[2].score < d.candidates[1].score


def test_chosen_local_is_followed_by_peers_by_score() -> None:
    work = Work(max_tokens=100)
    peers = [node("slow", "pcrt", speed(5.0)), node("quick", "vllm", speed(15.0))]
    d = decide(work, local(speed(20.0)), peers)
    assert order(d) == ["laptop", "quick", "slow"]
    assert [c.kind for c in d.candidates] == ["local", "vllm", "pcrt"]


def test_peer_ties_are_broken_by_name_whatever_the_input_order() -> None:
    peers = [node("charlie"), node("alpha"), node("bravo")]
    d1 = decide(Work(route="peer"), None, peers)
    d2 = decide(Work(route="peer"), None, list(reversed(peers)))
    assert order(d1) == order(d2) == ["alpha", "bravo", "charlie"]
    assert d1.candidates == d2.candidates


def test_load_moves_work_through_queue_wait() -> None:
    work = Work(max_tokens=100, complexity="medium")
    busy = node("busy", "pcrt", speed(40.0), queue_depth=3)  # 2.5 + 3 * 2.5 = 10 s
    idle = node("idle", "pcrt", speed(20.0))  # 5 s
    d = decide(work, None, [busy, idle])
    assert order(d) == ["idle", "busy"]
    assert d.candidates[1].why == "qwen-7b, est. 10.0 s, queue 3"


def test_decisions_are_repeatable_and_inputs_untouched() -> None:
    here = local(speed(20.0), on_battery=True, battery_percent=10.0)
    peers = (node("b", "vllm", speed(30.0)), node("a", "pcrt", speed(30.0)))
    work = Work(max_tokens=100, complexity="medium")
    before = (here, peers, work)
    assert decide(work, here, peers) == decide(work, here, peers)
    assert (here, peers, work) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        here.queue_depth = 3  # type: ignore[misc]  # the point: it is frozen


# -- what the caller reads --------------------------------------------------------------


def test_candidate_names_the_model_as_the_peer_calls_it() -> None:
    peer = node("gpu", "vllm", offer("Qwen/Qwen2.5-7B-Instruct", aliases=("qwen-7b",)))
    d = decide(Work(model="qwen-7b", max_tokens=100), local(offer("smollm2-135m")), [peer])
    assert d.chosen == Candidate(
        node="gpu",
        kind="vllm",
        model="Qwen/Qwen2.5-7B-Instruct",
        est_seconds=5.0,
        score=7.5,
        why="Qwen/Qwen2.5-7B-Instruct, est. 5.0 s, queue 0",
    )
    assert d.reason == (
        "peer gpu: Qwen/Qwen2.5-7B-Instruct, est. 5.0 s vs local: no such model qwen-7b"
    )


def test_tag_resolves_to_a_different_model_on_each_node() -> None:
    here = local(offer("smollm2-135m", tags=("simple",), loaded=True), offer("qwen-0.5b"))
    peer = node("box", "pcrt", offer("llama-1b", tags=("simple", "fast")))
    d = decide(Work(tag="simple"), here, [peer])
    assert [(c.node, c.model) for c in d.candidates] == [
        ("laptop", "smollm2-135m"),
        ("box", "llama-1b"),
    ]


def test_local_is_recognised_whatever_kind_its_view_carries() -> None:
    here = NodeView(name="laptop", kind="pcrt", models=(offer(),))
    d = decide(Work(), here, [])
    assert d.is_local
    assert d.chosen is not None and d.chosen.kind == "local"
    assert d.reason == "local: qwen-7b, est. 12.8 s vs no peers"


def test_nowhere_to_run_lists_every_reason() -> None:
    d = decide(Work(model="x"), local(), [node("gpu-box", healthy=False)])
    assert d.candidates == ()
    assert d.chosen is None
    assert not d.is_local
    assert d.reason == "nowhere to run: local: no such model x; gpu-box: unhealthy: in cooldown"


def test_nowhere_to_run_without_a_local_node() -> None:
    assert decide(Work(), None, []).reason == "nowhere to run: no local node"
    assert decide(Work(route="peer"), None, []).reason == "nowhere to run: no nodes"
    d = decide(Work(route="local"), None, [node("gpu")])
    assert d.reason == "nowhere to run: no local node; gpu: route hint: local only"


def test_peer_without_a_local_node_says_so() -> None:
    d = decide(Work(max_tokens=100), None, [node("gpu", "vllm")])
    assert order(d) == ["gpu"]
    assert d.reason == "peer gpu: qwen-7b, est. 5.0 s vs no local node"
