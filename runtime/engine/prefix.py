"""Prefix reuse: where a new prompt goes and where its cached prefix comes from.

Pure functions over plain data (slots' token lists, prompts, counts): no llama.cpp, no
clock, no engine. The scheduler calls them when it admits a request:

1. ``choose_slots``: the free slots a request takes. The main one (the slot that computes
   the prompt) is the free slot with the longest common prefix with the prompt (the
   least recently used among equals); a fork's other branches take the least recently
   used of the rest.
2. ``choose_donor``: whether another slot (busy or not) holds a longer prefix worth
   copying into the main slot rather than computing.
3. ``choose_leader``: whether a request sent together with others should wait for a
   running prefill of the same prefix and copy it, rather than compute it too.

Copies cost something: the KV moves through llama.cpp's sequence state (see ``kv``),
about 1/18 of recomputing it per token (measured), so a copy must gain more than
1/``COPY_COST_RATIO`` of the tokens it moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from pcrt.runtime.engine.slots import Slot

__all__ = [
    "COPY_COST_RATIO",
    "COPY_MIN_TOKENS",
    "FOLLOW_MIN_TOKENS",
    "Prefill",
    "choose_donor",
    "choose_leader",
    "choose_slots",
    "common_prefix",
    "copy_worth",
    "follow_worth",
]

COPY_COST_RATIO = 16
"""A copy moves the source's whole sequence at about 1/18 of recomputing it per token: it
must gain more than 1/16 of the tokens it moves."""

COPY_MIN_TOKENS = 16
"""A copy from another slot must gain at least this many prompt tokens."""

FOLLOW_MIN_TOKENS = 64
"""A request waits for a sibling's prefill only to save this many: waiting costs a step,
where a few more tokens in the leader's batch cost next to nothing."""


class Prefill(Protocol):
    """A running request's prefill that another request could follow."""

    @property
    def prompt(self) -> Sequence[int]: ...

    @property
    def prefill_pos(self) -> int:
        """Prompt tokens whose KV is computed so far."""
        ...


P = TypeVar("P", bound=Prefill)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def choose_slots(prompt: Sequence[int], free: Sequence[Slot], n: int) -> list[Slot]:
    """The ``n`` free slots a request takes, the one that computes its prompt first."""
    main = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
    rest = [s for s in sorted(free, key=lambda s: s.last_used) if s is not main]
    return [main, *rest][:n]


def copy_worth(gain: int, moved: int) -> bool:
    """Whether copying a sequence of ``moved`` tokens to save computing ``gain`` pays."""
    return gain >= COPY_MIN_TOKENS and gain * COPY_COST_RATIO > moved


def follow_worth(gain: int, moved: int) -> bool:
    """Whether waiting for a leader's prefill of ``moved`` tokens, then copying it, to save
    computing ``gain`` pays (a copy's rule, plus the cost of waiting)."""
    return gain >= FOLLOW_MIN_TOKENS and gain * COPY_COST_RATIO > moved


def choose_donor(
    prompt: Sequence[int], slots: Sequence[Slot], main: Slot, cached: int
) -> tuple[Slot, int] | None:
    """Another slot whose longer prefix of ``prompt`` is worth copying into ``main``
    (which holds ``cached`` of it), and that prefix's length; None when there is none."""
    donor = max(slots, key=lambda s: common_prefix(s.tokens, prompt))
    shared = common_prefix(donor.tokens, prompt)
    if donor is not main and copy_worth(shared - cached, len(donor.tokens)):
        return donor, shared
    return None


def choose_leader(
    prompt: Sequence[int], cached: int, prefills: Iterable[P]
) -> tuple[P, int] | None:
    """A running prefill (of requests sent together: one system prompt, one DAG context)
    that will compute a longer prefix of ``prompt`` than the ``cached`` tokens a slot
    gave it, and how many tokens to take from it; None when computing them here is as
    cheap. At most all but the last prompt token: that one is decoded for its logits."""
    best: tuple[P, int] | None = None
    for leader in prefills:
        shared = min(common_prefix(leader.prompt, prompt), len(prompt) - 1)
        gain = shared - max(cached, leader.prefill_pos)
        if follow_worth(gain, len(leader.prompt)) and (best is None or shared > best[1]):
            best = (leader, shared)
    return best
