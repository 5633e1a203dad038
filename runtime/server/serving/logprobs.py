"""Token log probabilities in OpenAI's two wire shapes.

Chat completions: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
"refusal": null}``, one entry per generated token. Legacy text completions: parallel
lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (a ``{token: logprob}`` map per
token) and ``text_offset`` (where each token starts in the text). The values are the
model's own distribution, before sampling and before any grammar (``sampling.token_logprob``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pcrt.runtime.engine import Candidate, TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs"]


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_chat_entry(e) for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``offset``: where the first of ``entries`` starts in the choice's text (a stream's
    later chunks go on from the earlier ones)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(_text(entry.chosen))
    return {
        "tokens": [_text(e.chosen) for e in entries],
        "token_logprobs": [e.chosen.logprob for e in entries],
        "top_logprobs": [{_text(c): c.logprob for c in e.top} for e in entries],
        "text_offset": offsets,
    }


def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    return {**_candidate(entry.chosen), "top_logprobs": [_candidate(c) for c in entry.top]}


def _candidate(candidate: Candidate) -> dict[str, Any]:
    return {
        "token": _text(candidate),
        "logprob": candidate.logprob,
        "bytes": list(candidate.piece),
    }


def _text(candidate: Candidate) -> str:
    # a piece may be part of a character (byte-level BPE): its bytes say the rest
    return candidate.piece.decode("utf-8", "replace")
