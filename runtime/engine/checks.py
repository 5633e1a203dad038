"""The checks of a request that need no model: what ``Engine.prepare`` refuses before any
work besides the grammar, the state and the vocabulary. A stand-in engine runs the same
ones, so its refusals read exactly as the real engine's."""

from __future__ import annotations

from collections.abc import Sequence

from pcrt.runtime.errors import ContextLengthExceeded, EngineClosed, InvalidRequest

__all__ = ["check_open", "check_prompt", "check_slots", "prompt_too_long"]


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
        raise prompt_too_long(len(prompt), name, context_per_slot)


def prompt_too_long(
    tokens: int, name: str, context_per_slot: int, *, at_least: bool = False
) -> ContextLengthExceeded:
    """The refusal of a prompt of ``tokens`` tokens (``at_least``: a lower bound, when the
    prompt was refused before it was tokenized whole)."""
    count = f"at least {tokens}" if at_least else str(tokens)
    return ContextLengthExceeded(
        f"the prompt has {count} tokens; {name!r} takes at most "
        f"{context_per_slot - 1} per request (context {context_per_slot})"
    )
