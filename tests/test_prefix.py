"""The engine's prefix-reuse choices, as pure functions: no model, no llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass

from pcrt.runtime.engine.prefix import (
    COPY_COST_RATIO,
    COPY_MIN_TOKENS,
    FOLLOW_MIN_TOKENS,
    SLOT_PROMPT_SIMILARITY,
    by_value,
    choose_donor,
    choose_leader,
    choose_slots,
    common_prefix,
    copy_worth,
    follow_worth,
    prompt_similarity,
)
from pcrt.runtime.engine.slots import Slot

TEMPLATE = list(range(7))  # the ~7 tokens every chat of one template starts with


def agent(seed: int, n: int = 741) -> list[int]:
    """A chat prompt: the template's opening, then an agent's own system prompt."""
    return TEMPLATE + [1000 * seed + i for i in range(n - len(TEMPLATE))]


def test_common_prefix_and_similarity() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 == common_prefix([1], [])
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert prompt_similarity([1, 2, 9], [1, 2, 3, 4]) == 0.5
    assert prompt_similarity([1], []) == 0.0


def test_two_agents_taking_turns_keep_their_own_slots() -> None:
    """The bug this rule fixes: agent B's prompt shares only the template's opening with
    agent A's slot, so it goes to an empty slot instead of overwriting A's cache."""
    a, b = agent(1), agent(2)
    slots = [Slot(0, tokens=a + [5, 6, 7], last_used=10.0), Slot(1), Slot(2)]
    assert common_prefix(slots[0].tokens, b) == len(TEMPLATE)
    (main,) = choose_slots(b, slots, 1)
    assert main is slots[1]  # empty, and never used
    # B's turn ran there; A's second turn finds its own slot again
    slots[1].tokens, slots[1].last_used = b + [8, 9], 11.0
    (main,) = choose_slots(a + [5, 6, 7, 42], slots, 1)
    assert main is slots[0]
    (main,) = choose_slots(b + [8, 9, 43], slots, 1)
    assert main is slots[1]


def test_a_real_share_of_the_prompt_wins_over_an_empty_slot() -> None:
    prompt = list(range(100))
    holder = Slot(0, tokens=list(range(11)) + [999], last_used=5.0)  # 11% of the prompt
    empty = Slot(1)
    assert choose_slots(prompt, [empty, holder], 1) == [holder]
    # at exactly the threshold it is not taken (strictly over, as llama-server)
    at_threshold = Slot(0, tokens=list(range(10)), last_used=5.0)
    assert 10 / len(prompt) == SLOT_PROMPT_SIMILARITY
    assert choose_slots(prompt, [at_threshold, empty], 1) == [empty]


def test_the_best_share_wins_and_equal_shares_go_to_the_least_recently_used() -> None:
    prompt = list(range(100))
    short = Slot(0, tokens=list(range(30)), last_used=1.0)
    long = Slot(1, tokens=list(range(60)), last_used=9.0)
    assert choose_slots(prompt, [short, long], 1) == [long]
    older = Slot(2, tokens=list(range(60)), last_used=3.0)
    assert choose_slots(prompt, [short, long, older], 1) == [older]


def test_without_a_match_the_slot_with_least_to_lose_is_taken() -> None:
    prompt = agent(3)
    recent = Slot(0, tokens=agent(1), last_used=20.0)
    stale = Slot(1, tokens=agent(2), last_used=10.0)
    assert choose_slots(prompt, [recent, stale], 1) == [stale]
    # an empty slot loses nothing: first, even when it was cleared after the others' use
    cleared = Slot(2, tokens=[], last_used=30.0)
    assert choose_slots(prompt, [recent, stale, cleared], 1) == [cleared]
    assert by_value([recent, stale, cleared]) == [cleared, stale, recent]


def test_a_fork_takes_its_main_slot_then_the_least_valuable() -> None:
    prompt = list(range(50))
    match = Slot(0, tokens=list(range(40)), last_used=50.0)
    full_old = Slot(1, tokens=[7] * 20, last_used=1.0)
    empty = Slot(2, last_used=40.0)
    full_new = Slot(3, tokens=[8] * 20, last_used=45.0)
    free = [match, full_old, empty, full_new]
    assert choose_slots(prompt, free, 3) == [match, empty, full_old]
    assert choose_slots(agent(9), free, 2) == [empty, full_old]


def test_a_copy_from_another_slot_must_pay_for_moving_it() -> None:
    assert copy_worth(COPY_MIN_TOKENS, COPY_MIN_TOKENS) and not copy_worth(COPY_MIN_TOKENS - 1, 1)
    # the gain must be more than 1/16 of what moves
    assert copy_worth(100, 100 * COPY_COST_RATIO - 1)
    assert not copy_worth(100, 100 * COPY_COST_RATIO)
    prompt = list(range(300))
    main = Slot(0, tokens=list(range(10)))
    donor = Slot(1, tokens=list(range(200)) + [-1] * 100, busy=True)  # busy slots give too
    assert choose_donor(prompt, [main, donor], main, 10) == (donor, 200)
    # a donor whose sequence is far longer than the gain is not worth moving
    bloated = Slot(1, tokens=list(range(40)) + [-1] * 2000)
    assert choose_donor(prompt, [main, bloated], main, 10) is None
    # the main slot itself is never its own donor
    assert choose_donor(prompt, [main], main, 10) is None


@dataclass
class Running:
    prompt: list[int]
    prefill_pos: int = 0


def test_a_request_follows_the_prefill_that_saves_it_most() -> None:
    preamble = list(range(300))
    prompt = preamble + [-1, -2]
    near = Running(preamble[:100] + [5] * 200)
    far = Running(preamble + [7] * 10)
    assert choose_leader(prompt, 0, [near, far]) == (far, 300)
    # at most all but the last prompt token: that one is decoded here for its logits
    same = Running(list(prompt))
    assert choose_leader(prompt, 0, [same]) == (same, len(prompt) - 1)
    # nothing to gain when the slot or the leader's progress already covers it
    assert choose_leader(prompt, 290, [far]) is None
    assert choose_leader(prompt, 0, [Running(far.prompt, prefill_pos=280)]) is None
    # waiting costs a step: small gains are computed here
    small = Running(preamble[: FOLLOW_MIN_TOKENS - 1] + [5])
    assert choose_leader(prompt, 0, [small]) is None
    assert follow_worth(FOLLOW_MIN_TOKENS, FOLLOW_MIN_TOKENS)
    assert not follow_worth(FOLLOW_MIN_TOKENS, FOLLOW_MIN_TOKENS * COPY_COST_RATIO)
    assert choose_leader(prompt, 0, []) is None
