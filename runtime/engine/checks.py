"""The checks of a request that need no model: what ``Engine.prepare`` refuses before any
work besides the grammar, the state and the vocabulary. A stand-in engine runs the same
ones, so its refusals read exactly as the real engine's."""

from __future__ import annotations

from collections.abc import Sequence

from pcrt.runtime.errors import ContextLengthExceeded, EngineClosed, InvalidRequest

__all__ = ["check_open", "check_prompt", "check_slots"]


def check_open(closed: bool, name: str) -> None:
    if closed:
        raise EngineClosed(f"engine for {name!r} is shut down")


def check_slots(n: int, parallel: int) -> None:
    """``n`` continuations take as many slots at once."""
    if not 1 <= n <= parallel:
        raise InvalidRequest(
            f"n={n} continuations need as many slots; this model has {parallel} (raise --parallel)"
        )


def check_prompt(prompt: Sequence[int], name: str, context_per_slot: int) -> None:
    """A prompt is not empty and leaves room in its slot for at least one new token."""
    if not prompt:
        raise InvalidRequest("the prompt is empty")
    if len(prompt) >= context_per_slot:
        raise ContextLengthExceeded(
            f"the prompt has {len(prompt)} tokens; {name!r} takes at most "
            f"{context_per_slot - 1} per request (context {context_per_slot})"
        )
