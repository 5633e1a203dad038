"""What callers hand the engine and what they get back: requests, events, results.

Plain data and no behaviour: a ``GenerateRequest`` goes in; ``TokenEvent``,
``CheckpointEvent`` and ``FinishEvent`` come out while it runs (one per branch ``index``
of a fork); a ``Completion`` with one ``Choice`` per branch ends it. ``SlotInfo`` is what
``Engine.slots()`` reports. The scheduler thread builds the events and results; the
caller's event loop reads them (``handoff.RequestHandle``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import Candidate, SamplingParams, TokenLogprob
from pcrt.runtime.engine.state import KVState

__all__ = [
    "Candidate",
    "CheckpointEvent",
    "Choice",
    "Completion",
    "Event",
    "FinishEvent",
    "FinishReason",
    "GenerateRequest",
    "SlotInfo",
    "TokenEvent",
    "TokenLogprob",
]

FinishReason: TypeAlias = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (text or tokens) or chat messages, and how to sample."""

    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    # the tools a chat template is given (OpenAI's shape), for templates that write them
    tools: tuple[dict[str, Any], ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    # token ids read before the prompt (Ollama's ``context``: an earlier prompt and answer);
    # the prompt's own text is then tokenized without a second BOS
    context: tuple[int, ...] = ()
    state: KVState | None = None  # restore this KV first (resume); its tokens prefix the prompt
    # restore this KV into the slot before matching the prompt against it: a prompt that
    # extends the state's tokens (a DAG node continuing its parent) computes only the rest
    context_state: KVState | None = None
    # tokens this sequence generated before a checkpoint it resumes from: the sampler chain
    # and the grammar accept them, so a schema-constrained output continues validly
    generated_prefix: tuple[int, ...] = ()
    export_state: bool = False  # attach each finished sequence's KV state to the result
    # every N generated tokens, emit a CheckpointEvent with the sequence's KV state, so a
    # crash loses at most N tokens of a long generation (0: never)
    checkpoint_every: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


@dataclass(frozen=True)
class TokenEvent:
    index: int  # fork branch
    text: str  # may be "" while text is held back (partial UTF-8 or a possible stop)
    token: int
    logprob: TokenLogprob | None = None  # when the request asked (``SamplingParams.logprobs``)


@dataclass(frozen=True)
class CheckpointEvent:
    """A resumable point: ``state.continuation`` re-creates this sequence exactly."""

    index: int
    state: KVState
    tokens: list[int]  # generated so far (the last one is ``state.next_token``)


@dataclass(frozen=True)
class FinishEvent:
    index: int
    finish_reason: FinishReason
    text: str  # the branch's whole output
    stop: str | None = None  # the stop string that ended it (APIs that name it: Anthropic's)


Event: TypeAlias = TokenEvent | CheckpointEvent | FinishEvent
"""What iterating a ``RequestHandle`` yields."""


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    state: KVState | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked


@dataclass
class Completion:
    """Everything a finished request produced."""

    id: str
    choices: list[Choice]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    t_submitted: float
    t_first_token: float | None
    t_done: float
    prompt_seconds: float  # admission to first sampled token
    # what compiling the output's grammar took (once per model and grammar: a cached one
    # reports its first compile); None when the output is not constrained
    grammar_seconds: float | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def decode_tokens_per_second(self) -> float:
        if self.t_first_token is None or self.completion_tokens < 2:
            return 0.0
        span = self.t_done - self.t_first_token
        return (self.completion_tokens - len(self.choices)) / span if span > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


@dataclass(frozen=True)
class SlotInfo:
    seq_id: int
    busy: bool
    n_tokens: int
