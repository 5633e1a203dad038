"""Prefix reuse: where a new prompt goes and where its cached prefix comes from.

Pure functions over plain data (slots' token lists, prompts, counts): no llama.cpp, no
clock, no engine. The scheduler calls them when it admits a request:

1. ``choose_slots``: the free slots a request takes. The main one (the slot that computes
   the prompt) is the free slot whose tokens start like the prompt, when more than
   ``SLOT_PROMPT_SIMILARITY`` of the prompt matches; otherwise the free slot with the
   least to lose: an empty one, else the least recently used. A fork's other branches
   take the next ones in that order.
2. ``choose_donor``: whether another slot (busy or not) holds a longer prefix worth
   copying into the main slot rather than computing.
3. ``choose_leader``: whether a request sent together with others should wait for a
   running prefill of the same prefix and copy it, rather than compute it too.

Why a threshold and not the longest match: every chat template starts with the same few
tokens, so the longest common prefix alone sends two agents with 740-token system
prompts, taking turns, into the same slot, each overwriting the other's cache while other
slots sit empty. llama.cpp's server picks a slot the same way (``get_available_slot`` in
``tools/server/server-context.cpp``, llama-cpp-python 0.3.36's vendored copy): the slot
whose longest common prefix is the largest share of the prompt, when that share is over
``--slot-prompt-similarity`` (default 0.1), else the least recently used slot. pcrt adds
one thing: an empty slot loses nothing, so it goes first even when it was used (and
cleared) more recently than a full one.

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
    "SLOT_PROMPT_SIMILARITY",
    "Prefill",
    "by_value",
    "choose_donor",
    "choose_leader",
    "choose_slots",
    "common_prefix",
    "copy_worth",
    "follow_worth",
    "prompt_similarity",
]

SLOT_PROMPT_SIMILARITY = 0.1
"""A free slot is taken for what it holds only when its common prefix with the prompt is
more than this share of the prompt (llama-server's ``--slot-prompt-similarity`` default)."""

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


def prompt_similarity(tokens: Sequence[int], prompt: Sequence[int]) -> float:
    """The share of ``prompt`` that a slot holding ``tokens`` already has."""
    return common_prefix(tokens, prompt) / len(prompt) if prompt else 0.0


def by_value(free: Iterable[Slot]) -> list[Slot]:
    """Slots in the order they are given up: empty ones first, then the least recently
    used (what a slot holds is worth less the longer nobody has asked for it)."""
    return sorted(free, key=lambda s: (bool(s.tokens), s.last_used))


def choose_slots(prompt: Sequence[int], free: Sequence[Slot], n: int) -> list[Slot]:
    """The ``n`` free slots a request takes, the one that computes its prompt first."""
    main: Slot | None = None
    best = (SLOT_PROMPT_SIMILARITY, 0.0)
    for slot in free:
        # strictly over the threshold (as llama-server); among equal shares the least
        # recently used, as the longest-prefix choice before it did
        share = (prompt_similarity(slot.tokens, prompt), -slot.last_used)
        if share[0] > SLOT_PROMPT_SIMILARITY and (main is None or share > best):
            main, best = slot, share
    order = by_value(free)
    if main is None:
        main = order[0]
    return [main, *(s for s in order if s is not main)][:n]


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
