"""Per-request sampling parameters and the llama.cpp sampler chain built from them.

Each request (each fork branch) owns its own chain, so requests decoded in one batch never
share sampler state. The chain order follows llama.cpp's common sampler: logit bias,
penalties, then top-k, top-p, min-p, temperature and the final pick (greedy at
temperature 0, a seeded distribution otherwise).

A constrained sequence (a JSON schema, a grammar) also owns a ``Guide``: its llguidance
matcher and the buffers of its pick. The pick is llama.cpp's own (``common_sampler_sample``
with ``grammar_first`` off): sample from the whole row, check only that token against the
grammar (a few µs), and only when it is refused (6-8% of steps on JSON) compute the
grammar's token mask and sample again among the allowed tokens. Masking every step would
cost 0.3 ms a token; this adds 0.11 ms on average (bench.structured times each pick: 202
against 91 µs free). Greedy picks exactly the masked argmax; with top-k/top-p/min-p the
truncation sees the whole row first, as in llama.cpp.
"""

from __future__ import annotations

import ctypes
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Self

import llama_cpp
import numpy as np
from llguidance import LLMatcher
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pcrt.runtime.engine.constraints import Constraint, constraint_of
from pcrt.runtime.errors import InvalidRequest, PcrtError, StateError

__all__ = [
    "Candidate",
    "Guide",
    "Sampler",
    "SamplingParams",
    "TokenLogprob",
    "Trigger",
    "logits_row",
    "resolve_seed",
    "token_logprob",
]

# llama.cpp's llama_token_data, so a numpy array can be handed to llama_sampler_apply
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class SamplingParams(BaseModel):
    """What a caller may set per request. Defaults follow llama.cpp's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    penalty_last_n: int = Field(default=64, ge=-1)
    seed: int | None = None
    max_tokens: int = Field(default=256, ge=0)
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = {}
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    # a lazy constraint (tool calls with tool_choice "auto"): the output is free until it
    # first holds one of these texts (a special token counts by its text), and the
    # grammar, which starts with that text, holds from the token that began it on;
    # ``anchored_triggers``: those of them that count only at the output's start
    grammar_triggers: tuple[str, ...] = ()
    anchored_triggers: tuple[str, ...] = ()
    # special tokens whose text the output shows (a call format's markers, such as
    # Mistral's [TOOL_CALLS]); other special tokens add nothing to the text
    shown_specials: tuple[str, ...] = ()
    # report each generated token's log probability and this many likeliest tokens in
    # its place (0-20, as OpenAI allows); None: not at all (it costs ~0.1 ms a token)
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingParams:
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give either json_schema or grammar, not both")
        if self.grammar_triggers and self.json_schema is None and self.grammar is None:
            raise ValueError("grammar_triggers start a grammar; give one")
        if any(t == "" for t in self.grammar_triggers):
            raise ValueError("a grammar trigger must not be empty")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(math.isnan(bias) for bias in self.logit_bias.values()):
            raise ValueError("a logit_bias value is NaN")
        # the constraint is checked and compiled in ``prepare``: a thread, not the event
        # loop that builds these
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("constraint", None)  # worked out again from the copy's fields
        return copied

    @cached_property
    def constraint(self) -> Constraint | None:
        """What this request's output must match (``ConstraintInvalid`` if it is out of
        bounds), or None; compiled by the engine's ``GrammarCompiler``. Worked out once
        (``prepare``'s thread), not again on the scheduler's."""
        return constraint_of(self.json_schema, self.grammar)


# what OpenAI writes for a token no sampler could pick; JSON has no -Infinity
LOWEST_LOGPROB = -9999.0


@dataclass(frozen=True)
class Candidate:
    token: int
    piece: bytes  # as logprobs show it: a special token by its text
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model (the log-softmax of its raw
    logits, before any sampler or grammar) and the likeliest tokens in its place."""

    chosen: Candidate
    top: tuple[Candidate, ...] = ()


def logits_row(ctx: Any, batch_index: int, n_vocab: int) -> np.ndarray:
    """The logits llama.cpp computed at ``batch_index``: a view, no copy; valid until the
    next decode."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, batch_index), (n_vocab,))


def token_logprob(
    logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """``token``'s log probability in ``logits`` and the ``top`` likeliest alternatives."""
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))

    def candidate(t: int) -> Candidate:
        return Candidate(t, piece(t), max(float(logits[t]) - log_total, LOWEST_LOGPROB))

    best = tuple(candidate(int(t)) for t in _likeliest(logits, peak, top)) if top else ()
    return TokenLogprob(candidate(token), best)


def _likeliest(logits: np.ndarray, peak: float, k: int) -> np.ndarray:
    """The ``k`` highest logits' ids, highest first. A partition of the whole row costs
    0.35 ms; the few tokens near the peak, found first, cost 0.04 ms."""
    for margin in (4.0, 8.0, 16.0):
        near = np.flatnonzero(logits >= peak - margin)
        if len(near) >= k:
            break
    else:
        near = np.arange(len(logits))
    ids = near[np.argpartition(logits[near], -k)[-k:]]
    return ids[np.argsort(-logits[ids], kind="stable")]


class Trigger:
    """Where a lazily constrained output's grammar begins: the first place its text holds
    one of the triggers (a tool-call marker), written as one special token or spelled
    out over several, even starting inside a token ("Sure<tool" + "_call>").

    It keeps only the last tokens that a trigger could still span, so watching costs the
    same after ten tokens of prose as after ten thousand."""

    def __init__(
        self,
        texts: tuple[str, ...],
        token_bytes: Callable[[int], bytes],
        anchored: tuple[str, ...] = (),
    ) -> None:
        self._texts = tuple(t.encode("utf-8") for t in texts)
        # of those, the ones that count only at the start, after whitespace (Llama 3's
        # bare '{"name":'): JSON in an answer is not a call
        self._anchored = {t.encode("utf-8") for t in anchored}
        self._span = max(len(t) for t in self._texts)
        self._token_bytes = token_bytes  # special tokens by their text
        self._recent: list[tuple[int, bytes]] = []
        self._held = 0  # bytes in _recent
        self._seen = 0  # bytes remembered in all
        self._blank = 0  # of those, the leading whitespace (fixed after the first other)

    def opened_by(self, token: int) -> list[int] | None:
        """If ``token`` completes a trigger: the tokens the grammar must take, from the
        one holding the trigger's first byte through ``token``. Else None."""
        piece = self._token_bytes(token)
        window = b"".join(p for _, p in self._recent) + piece
        starts = [i for i in (self._start(window, t) for t in self._texts) if i >= 0]
        if not starts:
            return None
        first, seen = min(starts), 0
        tokens = [*self._recent, (token, piece)]
        for k, (_, p) in enumerate(tokens):
            if seen + len(p) > first:
                return [t for t, _ in tokens[k:]]
            seen += len(p)
        return [token]  # not reached: the trigger starts inside the window

    def _start(self, window: bytes, text: bytes) -> int:
        found = window.find(text)
        if found < 0 or text not in self._anchored:
            return found
        at = self._seen - self._held + found  # in the whole output
        blank = self._blank
        if blank == self._seen:  # all blank so far: the window's own leading blanks count
            blank += len(window) - self._held - len(window[self._held :].lstrip())
        return found if at <= blank else -1

    def remember(self, token: int) -> None:
        piece = self._token_bytes(token)
        if self._blank == self._seen:
            self._blank += len(piece) - len(piece.lstrip())
        self._seen += len(piece)
        self._recent.append((token, piece))
        self._held += len(piece)
        # a trigger the next token completes starts at most span - 1 bytes back
        while self._recent and self._held - len(self._recent[0][1]) >= self._span - 1:
            self._held -= len(self._recent.pop(0)[1])


class Guide:
    """One sequence's place in its grammar, and the buffers its constrained pick reuses.

    ``grammar`` is the compiled, pristine matcher that every sequence shares; the guide
    copies it. With a ``trigger`` (a lazy constraint) the copy waits for the trigger:
    until then every token is the chain's free pick, and nothing is masked or kept."""

    def __init__(self, grammar: LLMatcher, n_vocab: int, trigger: Trigger | None = None) -> None:
        self._grammar = grammar
        self.trigger = trigger
        self.matcher: LLMatcher | None = None if trigger else grammar.deep_copy()
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._array = llama_cpp.llama_token_data_array(
            data=self._candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        self._array_ref = ctypes.byref(self._array)
        self._mask = allocate_token_bitmask(1, n_vocab)

    def pick(self, chain: Any, logits: np.ndarray, first: int | None = None) -> int:
        """The chain's pick from ``logits`` that the grammar allows, not yet accepted.
        ``first``: the chain's pick from the whole row, when the caller already has it."""
        token = self._apply(chain, logits, None) if first is None else first
        if self.matcher is None:
            assert self.trigger is not None
            opened = self.trigger.opened_by(token)
            if opened is None:
                return token  # free text
            self._open(opened[:-1])  # then this token is checked like any other
        matcher = self._open_matcher()
        self._check(matcher)
        if matcher.validate_tokens([token]) == 1:
            return token
        fill_next_token_bitmask(matcher, self._mask, 0)
        self._check(matcher)
        bits = np.unpackbits(self._mask[0].view(np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[: self._n_vocab]).astype(np.int32)
        if allowed.size == 0:  # llguidance never leads into a dead end; never pick blindly
            raise InvalidRequest("the grammar allows no token at this point of the output")
        return self._apply(chain, logits, allowed)

    def accept(self, token: int) -> None:
        if self.matcher is None:
            assert self.trigger is not None
            self.trigger.remember(token)
            return
        if not self.matcher.consume_token(token):
            self._check(self.matcher)
            raise InvalidRequest(f"the grammar refused token {token} it had allowed")

    def replay(self, tokens: tuple[int, ...] | list[int]) -> None:
        """Take tokens this sequence generated before (a resume), free ones included."""
        rest = list(tokens)
        while rest and self.matcher is None:
            assert self.trigger is not None
            token = rest[0]
            opened = self.trigger.opened_by(token)
            if opened is not None:
                self._open(opened[:-1])
                break
            self.trigger.remember(token)
            rest.pop(0)
        if rest and not self._open_matcher().consume_tokens(rest):
            raise StateError("the tokens generated before this resume do not fit its grammar")

    @property
    def ended(self) -> bool:
        """Nothing but the end may follow: the sequence is done (whole, not failed)."""
        if self.matcher is None:
            return False
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()

    def _open(self, before: list[int]) -> None:
        """The trigger is here: the grammar starts, from the token that began it."""
        self.matcher = self._grammar.deep_copy()
        if before and not self.matcher.consume_tokens(before):
            self._check(self.matcher)
            raise InvalidRequest("the grammar refused the text that began its trigger")

    def _open_matcher(self) -> LLMatcher:
        assert self.matcher is not None
        return self.matcher

    @staticmethod
    def _check(matcher: LLMatcher) -> None:
        """A matcher in llguidance's error state (a runtime limit such as lexer fuel, or a
        refused token) allows only the end: that would end the output broken, as "stop"."""
        if matcher.is_error():
            raise InvalidRequest(
                f"constrained decoding failed: {matcher.get_error() or 'no reason given'}"
            )

    def _apply(self, chain: Any, logits: np.ndarray, ids: np.ndarray | None) -> int:
        cand = self._candidates
        if ids is None:
            n = self._n_vocab
            cand["id"] = self._ids
            cand["logit"] = logits
        else:
            n = len(ids)
            cand["id"][:n] = ids
            cand["logit"][:n] = logits[ids]
        self._array.size = n
        self._array.selected = -1
        self._array.sorted = False
        llama_cpp.llama_sampler_apply(chain, self._array_ref)  # apply only: no accept yet
        selected = self._array.selected
        if not 0 <= selected < n:  # llama_sampler_sample asserts the same
            raise PcrtError(f"the sampler chain selected no candidate ({selected} of {n})")
        return int(cand["id"][selected])


class Sampler:
    """One llama.cpp sampler chain, and a ``Guide`` when the output is constrained. Not
    thread-safe: the scheduler thread owns it."""

    def __init__(
        self,
        params: SamplingParams,
        vocab: Any,
        n_vocab: int,
        seed: int,
        context: int = 4096,
        guide: Guide | None = None,
    ) -> None:
        self.params = params
        self.guide = guide
        self._n_vocab = n_vocab
        # llama.cpp clamps a negative window to 0 (off); -1 means "the whole context" here
        self.penalty_window = context if params.penalty_last_n < 0 else params.penalty_last_n
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        self._penalties: Any = None
        try:
            self._build(params, vocab, n_vocab, seed)
        except BaseException:
            self.free()
            raise

    def _add(self, sampler: Any) -> Any:
        if not sampler:
            raise InvalidRequest("llama.cpp refused a sampler for these parameters")
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)
        return sampler

    def _build(self, p: SamplingParams, vocab: Any, n_vocab: int, seed: int) -> None:
        if p.logit_bias:
            bad = [t for t in p.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise InvalidRequest(f"logit_bias names tokens outside the vocabulary: {bad}")
            arr = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias.items()):
                arr[i].token = token  # type: ignore[assignment]
                arr[i].bias = bias
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            self._penalties = self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    self.penalty_window,
                    p.repeat_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                )
            )
        if p.greedy:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(p.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed prompt tokens to the penalties (not the grammar, which constrains output only)."""
        if self._penalties is None:
            return
        window = tokens[max(0, len(tokens) - self.penalty_window) :]
        for token in window:
            llama_cpp.llama_sampler_accept(self._penalties, token)

    def accept_generated(self, tokens: tuple[int, ...] | list[int]) -> None:
        """Replay tokens this sequence already generated (a resume): the penalties count
        them and the grammar advances past them (``StateError`` if they do not fit it)."""
        for token in tokens:
            llama_cpp.llama_sampler_accept(self._chain, token)
        if self.guide is not None:
            self.guide.replay(tokens)

    def sample(self, ctx: Any, batch_index: int) -> int:
        """Pick the next token from the logits at ``batch_index`` and accept it."""
        if self.guide is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))
        logits = logits_row(ctx, batch_index, self._n_vocab)
        if self._penalties is None:
            # no sampler in this chain keeps state on accept (only penalties do), so
            # llama.cpp's own pick over the whole row, in C, may accept before the check:
            # 0.1 ms a token less than filling a candidate array from Python
            first = int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))
            token = self.guide.pick(self._chain, logits, first)
        else:  # penalties count what is accepted: check first, accept the final pick only
            token = self.guide.pick(self._chain, logits)
            llama_cpp.llama_sampler_accept(self._chain, token)
        self.guide.accept(token)
        return token

    def free(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def resolve_seed(seed: int | None, branch: int) -> int:
    """Branch i of a seeded fork uses seed + i: reproducible, and branches differ."""
    base = random.getrandbits(32) if seed is None else seed
    return (base + branch) & 0xFFFFFFFF
