"""The engine: one loaded model, one llama.cpp context, continuous batching over slots.

One scheduler thread owns the context. Each step it puts the next token of every
decoding sequence, plus a chunk of any pending prompt, into one ``llama_decode`` call,
then samples each sequence from its own logits row with its own sampler chain. Callers
(asyncio code) submit requests and read events through queues; nothing here blocks an
event loop.

Slots are llama.cpp sequence ids. A slot keeps its tokens after a request ends, so a new
prompt that shares a prefix with any slot reuses that KV (copied from another slot when it
lives there) instead of recomputing it. A fork of N prefills once and copies the prompt's
KV into N-1 more slots.

Each slot has its own KV stream of ``context`` cells (``kv_unified`` off). In a unified
pool a sequence's attention runs over cells interleaved with other sequences', and the
changed summation order flips greedy near-ties: with separate streams a request decodes
exactly as it would alone, and exactly as llama-cpp-python's ``Llama`` decodes it. Copies
between streams go through llama.cpp's sequence state (get, then set): synchronous and
exact, where a cross-stream ``llama_memory_seq_cp`` is deferred to the next decode and
only allowed for whole sequences.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import llama_cpp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pcrt.runtime.engine.chat import ChatMessage, ChatRenderer
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.engine.sampling import Sampler, SamplingParams, resolve_seed
from pcrt.runtime.engine.state import (
    PORTABLE_LAYOUT,
    CompatKey,
    KVState,
    native_payload,
    portable_payload,
    raw_layout,
)
from pcrt.runtime.engine.textstream import TextStream
from pcrt.runtime.errors import (
    ContextLengthExceeded,
    EngineClosed,
    InvalidRequest,
    ModelLoadError,
    PcrtError,
    StateError,
)

if TYPE_CHECKING:
    from pcrt.device.offload import OffloadPlan

__all__ = [
    "CheckpointEvent",
    "Completion",
    "Engine",
    "EngineConfig",
    "FinishEvent",
    "GenerateRequest",
    "RequestHandle",
    "SlotInfo",
    "TokenEvent",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

FinishReason = Literal["stop", "length", "cancelled"]
_KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
_KV_TYPES = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


def default_threads() -> int:
    """Physical cores: llama.cpp's decode is compute-bound and hyperthreads do not help."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # psutil can fail inside odd containers; fall back to logical cores
        physical = None
    return max(1, physical or os.cpu_count() or 1)


class EngineConfig(BaseModel):
    """How a model is loaded. ``context`` is per slot; the KV pool holds context x parallel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    parallel: int = Field(default=4, ge=1, le=64)
    context: int = Field(default=4096, ge=64)
    n_threads: int = Field(default_factory=default_threads, ge=1)
    n_batch: int = Field(default=512, ge=16)
    # prompt tokens per step while other sequences are decoding: a 512-token step takes
    # about a second on 2 cores, and every running stream would stall for it
    prefill_chunk: int = Field(default=128, ge=1)
    type_k: Literal["f32", "f16", "q8_0", "q4_0"] = "f16"
    type_v: Literal["f32", "f16", "q8_0", "q4_0"] = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = 0
    main_gpu: int = Field(default=0, ge=0)
    # the share of layers per GPU (llama.cpp's tensor_split); None: llama.cpp decides
    tensor_split: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _batch_holds_every_slot(self) -> EngineConfig:
        if self.n_batch < self.parallel:
            raise ValueError(
                f"n_batch ({self.n_batch}) must be at least parallel ({self.parallel})"
            )
        return self


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (text or tokens) or chat messages, and how to sample."""

    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    state: KVState | None = None  # restore this KV first (resume); its tokens prefix the prompt
    # restore this KV into the slot before matching the prompt against it: a prompt that
    # extends the state's tokens (a DAG node continuing its parent) computes only the rest
    context_state: KVState | None = None
    # tokens this sequence generated before a checkpoint it resumes from: the sampler chain
    # (grammar included) accepts them, so a schema-constrained output continues validly
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


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    state: KVState | None = None


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


FOLLOW_MIN_TOKENS = 64  # a request waits for a sibling's prefill only to save this many


class RequestHandle:
    """The caller's side of a request: iterate it for events, then read ``result``."""

    def __init__(self, engine: Engine, request: GenerateRequest, prompt: list[int]) -> None:
        self.id = request.id
        self.request = request
        self.t_submitted = time.perf_counter()  # queue wait counts in time to first token
        self.prompt_tokens = prompt
        self.cached_tokens = 0
        self.result: Completion | None = None
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[list[Any]] = asyncio.Queue()
        self._pending: deque[Any] = deque()
        self._done = False

    def _deliver(self, items: list[Any]) -> None:
        """Called on the event loop (via call_soon_threadsafe) with one step's events."""
        self._events.put_nowait(items)

    def cancel(self) -> None:
        if not self._done:
            self._engine._inbox.put(("cancel", self.id))

    async def __aiter__(self) -> AsyncIterator[TokenEvent | CheckpointEvent | FinishEvent]:
        """Events in order. Leaving the loop early cancels the request.

        Undelivered events stay in the handle (not in this generator), so a second
        iteration, or ``completion()``, picks up where an earlier one stopped.
        """
        try:
            while True:
                if not self._pending:
                    if self._done:
                        return
                    self._pending.extend(await self._events.get())
                item = self._pending.popleft()
                if isinstance(item, Completion):
                    self.result = item
                    self._done = True
                elif isinstance(item, BaseException):
                    self._done = True
                    raise item
                else:
                    yield item
        finally:
            if not self._done:  # the consumer stopped early or was cancelled
                self.cancel()

    async def completion(self) -> Completion:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    busy: bool = False
    last_used: float = 0.0


@dataclass(eq=False)
class _Branch:
    choice: Choice
    slot: _Slot
    sampler: Sampler | None = None
    stream: TextStream | None = None
    pending: int | None = None  # sampled, not yet decoded
    batch_index: int = -1

    @property
    def active(self) -> bool:
        return self.choice.finish_reason is None


@dataclass(eq=False)
class _Job:
    handle: RequestHandle
    params: SamplingParams
    prompt: list[int]
    branches: list[_Branch] = field(default_factory=list)
    prefill_pos: int = 0
    chunk: int = 0  # prompt tokens in the current batch
    logits_row: int = -1  # batch row of the last prompt token, once it is in a batch
    t_admitted: float = 0.0
    t_first_token: float | None = None
    outbox: list[Any] = field(default_factory=list)
    # (leader, tokens): the leader is prefilling this job's first ``tokens`` prompt tokens
    # right now; this job waits for them and copies them instead of computing them twice
    follows: tuple[_Job, int] | None = None

    @property
    def prefilling(self) -> bool:
        return self.prefill_pos < len(self.prompt)


class Engine:
    """One model, one context, ``parallel`` slots, one scheduler thread."""

    plan: OffloadPlan | None = None
    """The offload plan ``runtime.loader.open_engine`` chose (None when built directly)."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_sha256: str,
        config: EngineConfig | None = None,
        name: str = "",
        chat_template: str | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.name = name or model_path.stem
        self.model = LlamaModel(
            model_path,
            n_gpu_layers=self.config.n_gpu_layers,
            main_gpu=self.config.main_gpu,
            tensor_split=self.config.tensor_split,
        )
        try:
            # the template first: a broken one must fail before the big allocations
            self.chat = ChatRenderer(
                chat_template or self.model.chat_template(),
                bos_token=self.model.token_text(self.model.bos_id),
                eos_token=self.model.token_text(self.model.eos_id),
                model_name=self.name,
            )
            self.context_per_slot = min(self.config.context, self.model.n_ctx_train or 10**9)
            self._ctx = self._new_context()
        except BaseException:
            self.model.close()
            raise
        self.n_stream = self.config.parallel  # one KV stream per slot (not unified)
        self._portable_state = not (
            llama_cpp.llama_model_n_swa(self.model.ptr) > 0
            or llama_cpp.llama_model_is_recurrent(self.model.ptr)
            or llama_cpp.llama_model_is_hybrid(self.model.ptr)
        )
        self.compat_key = CompatKey(
            model_sha256=model_sha256,
            type_k=self.config.type_k,
            type_v=self.config.type_v,
            flash_attn=self.config.flash_attn,
            layout=PORTABLE_LAYOUT if self._portable_state else raw_layout(self.n_stream),
        )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.config.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(self.config.parallel)]
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._outgoing: list[tuple[RequestHandle, list[Any]]] = []
        self._embed_ctx: Any = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"pcrt-engine-{self.name}", daemon=True
        )
        self._thread.start()

    # -- public API (any thread / event loop) ------------------------------------------

    def tokenize_request(self, request: GenerateRequest) -> list[int]:
        """The prompt tokens a request will run, after its chat template and state."""
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages")
        if request.messages is not None:
            text = self.chat.render(request.messages)
            # a template that writes the BOS text itself must not get a second BOS
            add_special = not (self.model.add_bos and text.startswith(self.chat.bos_token or "\0"))
            tokens = self.model.tokenize(text, add_special=add_special, parse_special=True)
        elif isinstance(request.prompt, str):
            tokens = self.model.tokenize(request.prompt, add_special=True, parse_special=True)
        else:
            tokens = list(request.prompt or [])
            bad = [t for t in tokens if not 0 <= t < self.model.n_vocab]
            if bad:
                raise InvalidRequest(f"prompt holds token ids outside the vocabulary: {bad[:5]}")
        if request.state is not None:
            tokens = request.state.continuation + tokens
        return tokens

    def submit(self, request: GenerateRequest, prepared: list[int] | None = None) -> RequestHandle:
        """Validate and queue a request. Must be called from a running event loop.

        ``prepared``: the tokens ``prepare(request)`` returned for this same request, when
        the caller already ran the checks (the API does, before charging rate limits), so
        the template, tokenizer and grammar are not run twice.
        """
        prompt = prepared if prepared is not None else self.prepare(request)
        handle = RequestHandle(self, request, prompt)
        self._inbox.put(("submit", handle))
        return handle

    def prepare(self, request: GenerateRequest) -> list[int]:
        """Every check a request can fail before any work, and its prompt tokens.

        Bad input (a grammar that does not parse, a logit bias outside the vocabulary, a
        prompt over the context) fails here, in the caller's thread, with a clear error:
        an HTTP client gets a 400 rather than an error event inside a started stream.
        """
        if self._closed:
            raise EngineClosed(f"engine for {self.name!r} is shut down")
        if not 1 <= request.n <= self.config.parallel:
            raise InvalidRequest(
                f"n={request.n} continuations need as many slots; this model has "
                f"{self.config.parallel} (raise --parallel)"
            )
        for given in (request.state, request.context_state):
            if given is not None:
                self._check_state(given)
        prompt = self.tokenize_request(request)
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if len(prompt) >= self.context_per_slot:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens; {self.name!r} takes at most "
                f"{self.context_per_slot - 1} per request (context {self.context_per_slot})"
            )
        Sampler(request.sampling, self.model.vocab, self.model.n_vocab, 0).free()
        return prompt

    async def generate(self, request: GenerateRequest) -> Completion:
        return await self.submit(request).completion()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler thread between two steps (it owns the context)."""
        if self._closed:
            raise EngineClosed(f"engine for {self.name!r} is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(("call", (fn, future)))
        return await asyncio.wrap_future(future)

    async def export_slot(self, seq_id: int) -> KVState:
        """The KV state of an idle slot (what its last request left there)."""

        def export() -> KVState:
            slot = self._slot(seq_id)
            if slot.busy:
                raise StateError(f"slot {seq_id} is busy; export it when its request ends")
            return self._export(slot, next_token=None)

        return await self.call(export)

    def _check_state(self, state: KVState) -> None:
        """StateError unless the state is this engine's kind and its tokens are this
        vocabulary's: a forged header with the right key must not hand llama.cpp ids it
        would index out of bounds."""
        state.check_compatible(self.compat_key)
        ids = [*state.tokens, *([state.next_token] if state.next_token is not None else [])]
        if any(not 0 <= t < self.model.n_vocab for t in ids):
            raise StateError("the state's tokens are outside this model's vocabulary")

    async def import_state(self, state: KVState) -> int:
        """Load a state into the least recently used idle slot; returns its seq id."""
        self._check_state(state)

        def restore() -> int:
            idle = [s for s in self._slots if not s.busy]
            if not idle:
                raise StateError("every slot is busy; retry when one is free")
            slot = min(idle, key=lambda s: s.last_used)
            self._restore(slot, state)
            return slot.seq_id

        return await self.call(restore)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings, one per text."""
        token_lists = [self.model.tokenize(t, add_special=True, parse_special=False) for t in texts]
        for i, tokens in enumerate(token_lists):
            if not tokens:
                raise InvalidRequest(f"input {i} is empty")
            if len(tokens) > self.context_per_slot:
                raise ContextLengthExceeded(
                    f"input {i} has {len(tokens)} tokens; at most {self.context_per_slot}"
                )
        return await self.call(lambda: [self._embed_one(t) for t in token_lists])

    async def clear_cache(self) -> int:
        """Drop the cached KV of every idle slot; returns how many tokens were dropped."""

        def clear() -> int:
            dropped = 0
            for slot in self._slots:
                if not slot.busy and slot.tokens:
                    self._seq_rm(slot.seq_id, 0)
                    dropped += len(slot.tokens)
                    slot.tokens = []
            return dropped

        return await self.call(clear)

    def slots(self) -> list[SlotInfo]:
        return [SlotInfo(s.seq_id, s.busy, len(s.tokens)) for s in self._slots]

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache allocated for all slots (an estimate from the shapes)."""
        m = self.model.ptr
        head_dim = llama_cpp.llama_model_n_embd(m) // max(1, llama_cpp.llama_model_n_head(m))
        per_cell_elements = (
            2 * llama_cpp.llama_model_n_layer(m) * llama_cpp.llama_model_n_head_kv(m) * head_dim
        )
        bytes_per = (
            _KV_BYTES_PER_ELEMENT[self.config.type_k] + _KV_BYTES_PER_ELEMENT[self.config.type_v]
        ) / 2
        return int(per_cell_elements * bytes_per * self.context_per_slot * self.config.parallel)

    @property
    def closed(self) -> bool:
        """True once shut down, or after the scheduler thread died."""
        return self._closed

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self._slots)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def close(self) -> None:
        """Stop the scheduler (pending requests fail with EngineClosed) and free memory."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("close", None))
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        if self._embed_ctx:
            llama_cpp.llama_free(self._embed_ctx)
        llama_cpp.llama_free(self._ctx)
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- scheduler thread ---------------------------------------------------------------

    def _new_context(self, *, embeddings: bool = False) -> Any:
        cfg = self.config
        params = llama_cpp.llama_context_default_params()
        if embeddings:
            params.n_ctx = self.context_per_slot
            params.n_batch = params.n_ubatch = self.context_per_slot
            params.n_seq_max = 1
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        else:
            params.n_ctx = self.context_per_slot * cfg.parallel
            params.n_batch = params.n_ubatch = cfg.n_batch
            params.n_seq_max = cfg.parallel
            params.kv_unified = False
        params.n_threads = params.n_threads_batch = cfg.n_threads
        params.type_k = _KV_TYPES[cfg.type_k]
        params.type_v = _KV_TYPES[cfg.type_v]
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if cfg.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {params.n_ctx} tokens for "
                f"{self.name!r} (out of memory, or an unsupported KV type / flash-attention mix)"
            )
        return ctx

    def _run(self) -> None:
        try:
            while True:
                idle = not self._running and not self._waiting
                try:
                    message = self._inbox.get() if idle else self._inbox.get_nowait()
                except queue.Empty:
                    message = None
                while message is not None:
                    if message[0] == "close":
                        self._shutdown()
                        return
                    self._handle(message)
                    try:
                        message = self._inbox.get_nowait()
                    except queue.Empty:
                        message = None
                self._admit()
                self._take_from_leaders()
                if self._running:
                    self._step()
                self._dispatch()
        except BaseException:  # a bug here must not hang every caller forever
            log.exception("engine scheduler crashed")
            self._closed = True
            self._shutdown(EngineClosed(f"the engine for {self.name!r} crashed; see the log"))

    def _handle(self, message: tuple[str, Any]) -> None:
        kind, payload = message
        if kind == "submit":
            self._waiting.append(self._new_job(payload))
        elif kind == "cancel":
            self._cancel(payload)
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _new_job(self, handle: RequestHandle) -> _Job:
        request = handle.request
        return _Job(
            handle=handle,
            params=request.sampling,
            prompt=handle.prompt_tokens,
            branches=[_Branch(Choice(i), slot=self._slots[0]) for i in range(request.n)],
        )

    def _shutdown(self, error: PcrtError | None = None) -> None:
        error = error or EngineClosed(f"engine for {self.name!r} shut down")
        for job in [*self._running, *self._waiting]:
            self._free_job(job)
            self._send(job, [error])
        self._running.clear()
        self._waiting.clear()
        while True:  # fail calls and submissions that raced with close
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._outgoing.append((payload, [error]))
            elif kind == "call" and payload[1].set_running_or_notify_cancel():
                payload[1].set_exception(error)
        self._dispatch()

    # -- admission and prefix reuse -------------------------------------------------

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            free = [s for s in self._slots if not s.busy]
            if len(free) < len(job.branches):
                return  # FIFO: a fork waiting for slots is not overtaken
            self._waiting.popleft()
            try:
                self._place(job, free)
            except Exception as exc:  # one bad request must not take the scheduler down
                if not isinstance(exc, PcrtError):
                    log.exception("could not start request %s", job.handle.id)
                    exc = PcrtError(f"the request could not start: {type(exc).__name__}")
                self._free_job(job)
                for br in job.branches:
                    if br.sampler is not None:
                        br.sampler.free()
                        br.sampler = None
                    br.slot.busy = False
                self._send(job, [exc])
                continue
            self._running.append(job)

    def _place(self, job: _Job, free: list[_Slot]) -> None:
        """Pick slots, restore a state or reuse the longest cached prefix."""
        prompt = job.prompt
        main = max(free, key=lambda s: (_common_prefix(s.tokens, prompt), -s.last_used))
        rest = [s for s in sorted(free, key=lambda s: s.last_used) if s is not main]
        for branch, slot in zip(job.branches, [main, *rest], strict=False):
            branch.slot = slot
            slot.busy = True
        request = job.handle.request
        state = request.state or request.context_state
        if state is not None and _common_prefix(main.tokens, prompt) < len(state.tokens):
            self._restore(main, state)
        common = _common_prefix(main.tokens, prompt)
        donor = max(self._slots, key=lambda s: _common_prefix(s.tokens, prompt))
        donor_common = _common_prefix(donor.tokens, prompt)
        gain = donor_common - common
        # a copy moves the donor's whole sequence (about 1/18 of recomputing per token,
        # measured): worth it only when the tokens gained outweigh that
        if donor is not main and gain >= 16 and gain * 16 > len(donor.tokens):
            self._copy_seq(donor, main, donor_common)
            common = len(main.tokens)
        common = min(common, len(prompt) - 1)  # the last prompt token must be decoded for logits
        if not self._seq_rm(main.seq_id, common):
            self._seq_rm(main.seq_id, 0)  # partial removal unsupported (e.g. SWA): start over
            common = 0
        del main.tokens[common:]
        job.prefill_pos = common
        job.handle.cached_tokens = common
        if state is None:
            job.follows = self._leader_for(prompt, common)
        job.t_admitted = time.perf_counter()
        for branch in job.branches:
            seed = resolve_seed(job.params.seed, branch.choice.index)
            branch.sampler = Sampler(
                job.params, self.model.vocab, self.model.n_vocab, seed, self.context_per_slot
            )
            generated = request.generated_prefix
            branch.sampler.accept_prompt(prompt[: len(prompt) - len(generated)])
            branch.sampler.accept_generated(generated)
            branch.stream = TextStream(job.params.stop)

    def _leader_for(self, prompt: list[int], common: int) -> tuple[_Job, int] | None:
        """A running job now prefilling a longer prefix of ``prompt`` than any slot holds
        (sibling requests sent together: one system prompt, one DAG context), and how many
        tokens to take from it; None when computing them here is as cheap."""
        best: tuple[_Job, int] | None = None
        for leader in self._running:
            if not leader.prefilling or leader.follows is not None:
                continue
            shared = min(_common_prefix(leader.prompt, prompt), len(prompt) - 1)
            gain = shared - max(common, leader.prefill_pos)
            # as for a copy from a slot, the gain must outweigh moving the leader's
            # sequence (about 1/18 of recomputing per token); and waiting costs a step,
            # where a few tokens more in the leader's batch cost next to nothing
            worth = gain >= FOLLOW_MIN_TOKENS and gain * 16 > len(leader.prompt)
            if worth and (best is None or shared > best[1]):
                best = (leader, shared)
        return best

    def _take_from_leaders(self) -> None:
        """Followers whose leader has computed their shared prefix copy it and go on
        prefilling from there; one whose leader stopped short prefills for itself."""
        for job in self._running:
            if job.follows is None:
                continue
            leader, shared = job.follows
            source = leader.branches[0].slot
            if _common_prefix(source.tokens, job.prompt) >= shared:
                main = job.branches[0].slot
                self._copy_seq(source, main, shared)  # empty when it cannot trim (SWA)
                job.prefill_pos = job.handle.cached_tokens = len(main.tokens)
                job.follows = None
            elif leader not in self._running or not leader.prefilling:
                job.follows = None  # cancelled or failed before it got there

    def _copy_seq(self, src: _Slot, dst: _Slot, n_tokens: int) -> None:
        """Make ``dst`` hold the first ``n_tokens`` of ``src``'s KV."""
        state = self._export(src, next_token=None)
        self._restore(dst, state)
        if n_tokens < len(dst.tokens):
            if self._seq_rm(dst.seq_id, n_tokens):
                del dst.tokens[n_tokens:]
            else:  # cannot trim (SWA): the copy is useless
                self._seq_rm(dst.seq_id, 0)
                dst.tokens = []

    def _seq_rm(self, seq_id: int, start: int) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, start, -1))

    # -- one batched decode step -----------------------------------------------------

    def _step(self) -> None:
        batch = self._batch
        n = 0
        decoding = [
            (job, br)
            for job in self._running
            if not job.prefilling
            for br in job.branches
            if br.active and br.pending is not None
        ]
        # in seq-id order: with a KV stream per slot, llama.cpp puts only consecutive,
        # increasing seq ids into one ubatch, so [2, 0, 1, 3] would cost two forward passes
        # (measured in bench.dag's shared-context DAG: 4-wide steps 47-52 ms -> 43 ms)
        decoding.sort(key=lambda pair: pair[1].slot.seq_id)
        for _job, br in decoding:
            assert br.pending is not None
            n = self._add(n, br.pending, len(br.slot.tokens), br.slot.seq_id, True)
            br.batch_index = n - 1
        prefilling: list[_Job] = []
        budget = (
            self.config.n_batch
            if not decoding
            else min(self.config.n_batch, n + self.config.prefill_chunk)
        )
        for job in self._running:
            if not job.prefilling or job.follows is not None or n >= budget:
                continue
            main = job.branches[0].slot
            take = min(budget - n, len(job.prompt) - job.prefill_pos)
            last = len(job.prompt) - 1
            for pos in range(job.prefill_pos, job.prefill_pos + take):
                if pos == last:
                    job.logits_row = n
                n = self._add(n, job.prompt[pos], pos, main.seq_id, pos == last)
            job.chunk = take
            prefilling.append(job)
        if n == 0:  # every running job waits on another (cannot last: see _leader_for)
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            self._fail_step(rc, decoding, prefilling)
            return
        now = time.perf_counter()
        for job, br in decoding:
            assert br.pending is not None
            br.slot.tokens.append(br.pending)
            br.pending = None
            self._sample(job, br, br.batch_index, now)
        for job in prefilling:
            main = job.branches[0].slot
            main.tokens.extend(job.prompt[job.prefill_pos : job.prefill_pos + job.chunk])
            job.prefill_pos += job.chunk
            if not job.prefilling:
                self._start_decoding(job, job.logits_row)
        self._flush_events()

    def _add(self, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch = self._batch
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _start_decoding(self, job: _Job, logits_index: int) -> None:
        """The prompt is in: copy its KV into the fork's other slots and sample each."""
        main = job.branches[0].slot
        for br in job.branches[1:]:
            self._copy_seq(main, br.slot, len(main.tokens))
        now = time.perf_counter()
        for br in job.branches:
            if job.params.max_tokens == 0:
                self._finish(job, br, "length")
            else:
                self._sample(job, br, logits_index, now)

    def _sample(self, job: _Job, br: _Branch, batch_index: int, now: float) -> None:
        assert br.sampler is not None and br.stream is not None
        token = br.sampler.sample(self._ctx, batch_index)
        if job.t_first_token is None:
            job.t_first_token = now
        br.pending = token
        if self.model.is_eog(token):
            self._finish(job, br, "stop")
            return
        br.choice.tokens.append(token)
        text = br.stream.feed(self.model.piece(token))
        br.choice.text += text
        job.outbox.append(TokenEvent(br.choice.index, text, token))
        if br.stream.stopped:
            self._finish(job, br, "stop")
        elif (
            len(br.choice.tokens) >= job.params.max_tokens
            or len(br.slot.tokens) + 1 >= self.context_per_slot  # the context is full
        ):
            self._finish(job, br, "length")
        else:
            every = job.handle.request.checkpoint_every
            if every and len(br.choice.tokens) % every == 0:
                self._checkpoint(job, br)

    def _checkpoint(self, job: _Job, br: _Branch) -> None:
        try:
            state = self._export(br.slot, next_token=br.pending)
        except PcrtError:  # a missed checkpoint costs recomputation after a crash, no more
            log.exception("could not checkpoint request %s", job.handle.id)
            return
        job.outbox.append(CheckpointEvent(br.choice.index, state, list(br.choice.tokens)))

    def _finish(self, job: _Job, br: _Branch, reason: FinishReason) -> None:
        assert br.stream is not None
        tail = br.stream.flush()
        if tail:
            br.choice.text += tail
            job.outbox.append(TokenEvent(br.choice.index, tail, -1))
        br.choice.finish_reason = reason
        if job.handle.request.export_state:
            try:
                br.choice.state = self._export(br.slot, next_token=br.pending)
            except PcrtError:  # the output stands; a missing state only costs a recompute
                log.exception("could not export the KV state of request %s", job.handle.id)
        self._release(br)
        job.outbox.append(FinishEvent(br.choice.index, reason, br.choice.text))
        if not any(b.active for b in job.branches):
            self._running.remove(job)
            job.outbox.append(self._completion(job))
            self._send(job, job.outbox)  # it leaves _running, so flush it here
            job.outbox = []

    def _release(self, br: _Branch) -> None:
        if br.sampler is not None:
            br.sampler.free()
            br.sampler = None
        br.slot.busy = False
        br.slot.last_used = time.monotonic()

    def _completion(self, job: _Job) -> Completion:
        now = time.perf_counter()
        first = job.t_first_token
        return Completion(
            id=job.handle.id,
            choices=[b.choice for b in job.branches],
            prompt_tokens=len(job.prompt),
            cached_tokens=job.handle.cached_tokens,
            completion_tokens=sum(len(b.choice.tokens) for b in job.branches),
            t_submitted=job.handle.t_submitted,
            t_first_token=first,
            t_done=now,
            prompt_seconds=(first - job.t_admitted) if first is not None else 0.0,
        )

    def _fail_step(
        self, rc: int, decoding: list[tuple[_Job, _Branch]], prefilling: list[_Job]
    ) -> None:
        jobs = {id(j): j for j in prefilling}
        for job, _ in decoding:
            jobs[id(job)] = job
        error = PcrtError(f"llama_decode failed (code {rc}); the request was stopped")
        log.error("llama_decode returned %d for %d sequences", rc, len(jobs))
        for job in jobs.values():
            for br in job.branches:
                self._seq_rm(br.slot.seq_id, 0)
                br.slot.tokens.clear()
            self._free_job(job)
            self._running.remove(job)
            self._send(job, [error])
        self._flush_events()

    def _cancel(self, request_id: str) -> None:
        for job in list(self._waiting):
            if job.handle.id == request_id:
                self._waiting.remove(job)
                for br in job.branches:
                    br.choice.finish_reason = "cancelled"
                self._send(job, [self._completion(job)])
                return
        for job in list(self._running):
            if job.handle.id == request_id:
                for br in job.branches:
                    if br.active:
                        self._finish(job, br, "cancelled")
                self._flush_events()
                return

    def _free_job(self, job: _Job) -> None:
        for br in job.branches:
            if br.active and br.slot.busy:
                self._release(br)

    def _flush_events(self) -> None:
        for job in self._running:
            if job.outbox:
                self._send(job, job.outbox)
                job.outbox = []

    def _send(self, job: _Job, items: list[Any]) -> None:
        """Queue events for the caller; ``_dispatch`` hands them over after the step."""
        self._outgoing.append((job.handle, list(items)))

    def _dispatch(self) -> None:
        """One wake-up per event loop per step, not one per request: on a 2-core machine
        every extra wake-up of the caller's thread takes CPU from llama.cpp's threads."""
        if not self._outgoing:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, list[Any]]]] = {}
        for handle, items in self._outgoing:
            by_loop.setdefault(handle._loop, []).append((handle, items))
        self._outgoing = []
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, deliveries)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                log.debug("dropping events for %d requests: their loop is closed", len(deliveries))

    # -- KV state ---------------------------------------------------------------------

    def _slot(self, seq_id: int) -> _Slot:
        if not 0 <= seq_id < len(self._slots):
            raise InvalidRequest(f"no slot {seq_id}: slots are 0..{len(self._slots) - 1}")
        return self._slots[seq_id]

    def _export(self, slot: _Slot, next_token: int | None) -> KVState:
        # llama.cpp writes straight into a bytearray that the state then views: this runs
        # on the scheduler thread, between decode steps, so every copy of tens of MB stalls
        # every running sequence
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        raw = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(raw)
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot.seq_id)
        del buf  # releases its export of ``raw``
        payload = memoryview(raw)[:written].toreadonly()
        if self._portable_state:
            payload = portable_payload(payload, self.n_stream, slot.seq_id)
        return KVState(
            key=self.compat_key,
            tokens=list(slot.tokens),
            next_token=next_token,
            payload=payload,
            model=self.name,
        )

    def _restore(self, slot: _Slot, state: KVState) -> None:
        if len(state.tokens) >= self.context_per_slot:
            raise ContextLengthExceeded(
                f"the state holds {len(state.tokens)} tokens; this engine's context is "
                f"{self.context_per_slot}"
            )
        self._seq_rm(slot.seq_id, 0)
        slot.tokens = []
        if self._portable_state:
            payload = native_payload(state, self.n_stream, slot.seq_id)
        else:  # ctypes borrows only a writable buffer
            payload = state.with_prefix(b"")
        buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
        ok = llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(payload), slot.seq_id)
        del buf
        if ok == 0:
            self._seq_rm(slot.seq_id, 0)
            raise StateError("llama.cpp refused the KV state (corrupt, or no room in the cache)")
        slot.tokens = list(state.tokens)
        slot.last_used = time.monotonic()

    # -- embeddings -------------------------------------------------------------------

    def _embed_one(self, tokens: list[int]) -> list[float]:
        if self._embed_ctx is None:
            self._embed_ctx = self._new_context(embeddings=True)
        ctx = self._embed_ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise PcrtError("llama.cpp failed to compute the embedding")
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
            if not ptr:
                raise InvalidRequest(f"model {self.name!r} gives no pooled embeddings")
            vec = ptr[: self.model.n_embd]
        finally:
            llama_cpp.llama_batch_free(batch)
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]


def _deliver_all(deliveries: list[tuple[RequestHandle, list[Any]]]) -> None:
    for handle, items in deliveries:
        handle._deliver(items)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
