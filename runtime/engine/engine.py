"""The engine: one loaded model, one llama.cpp context, continuous batching over slots.

``Engine`` is the facade callers use. It loads the model and its chat template, creates
the context, and starts the one scheduler thread that owns that context from then on
(``scheduler``). Its methods run on the caller's thread or event loop and never block it:

- checks and tokenization (``prepare``, ``tokenize_request``) run right here, so a bad
  request fails before any work (an HTTP client gets a 400, not an error mid-stream);
- ``submit`` queues a request and returns its ``RequestHandle`` (``handoff``): iterate it
  for events, or await ``completion()``;
- everything that touches the context (``export_slot``, ``import_state``,
  ``clear_cache``, ``embed``, ``call``) is sent to the scheduler thread and awaited.

The modules behind it, one job each: ``requests`` (the public types), ``config`` (how a
model is loaded), ``handoff`` (messages in, events out), ``slots`` (what a slot holds),
``prefix`` (which slot, which prefix to reuse: pure), ``kv`` (a slot's KV in and out, the
cache's size), ``scheduler`` (admission, the decode step, sampling), ``embeddings``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import llama_cpp

from pcrt.runtime.engine.chat import ChatRenderer
from pcrt.runtime.engine.checks import check_open, check_prompt, check_slots
from pcrt.runtime.engine.config import EngineConfig, new_context
from pcrt.runtime.engine.embeddings import Embedder
from pcrt.runtime.engine.handoff import Call, Close, Inbox, RequestHandle, Submit
from pcrt.runtime.engine.kv import SlotKV, has_portable_state, kv_cache_bytes, kv_shape
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.engine.requests import Completion, GenerateRequest, SlotInfo
from pcrt.runtime.engine.sampling import Sampler
from pcrt.runtime.engine.scheduler import Scheduler
from pcrt.runtime.engine.state import PORTABLE_LAYOUT, CompatKey, KVState, raw_layout
from pcrt.runtime.errors import (
    ContextLengthExceeded,
    EngineClosed,
    InvalidRequest,
    StateError,
)

if TYPE_CHECKING:
    from pcrt.device.offload import OffloadPlan

__all__ = ["Engine"]

log = logging.getLogger(__name__)
T = TypeVar("T")


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
            self._ctx = new_context(self.model, self.config, self.context_per_slot, name=self.name)
        except BaseException:
            self.model.close()
            raise
        self.n_stream = self.config.parallel  # one KV stream per slot (not unified)
        portable = has_portable_state(self.model)
        self.compat_key = CompatKey(
            model_sha256=model_sha256,
            type_k=self.config.type_k,
            type_v=self.config.type_v,
            flash_attn=self.config.flash_attn,
            layout=PORTABLE_LAYOUT if portable else raw_layout(self.n_stream),
        )
        kv = SlotKV(
            self._ctx,
            compat_key=self.compat_key,
            n_stream=self.n_stream,
            portable=portable,
            context_per_slot=self.context_per_slot,
            model_name=self.name,
        )
        self._inbox: Inbox = Inbox()
        self._scheduler = Scheduler(
            self._ctx,
            model=self.model,
            config=self.config,
            context_per_slot=self.context_per_slot,
            kv=kv,
            inbox=self._inbox,
            name=self.name,
        )
        self._embedder = Embedder(self.model, self.config, self.context_per_slot, self.name)
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"pcrt-engine-{self.name}", daemon=True
        )
        self._thread.start()

    # -- requests (the caller's thread or event loop) ---------------------------------

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
        handle = RequestHandle(self._inbox, request, prompt)
        self._inbox.put(Submit(handle))
        return handle

    def prepare(self, request: GenerateRequest) -> list[int]:
        """Every check a request can fail before any work, and its prompt tokens.

        Bad input (a grammar that does not parse, a logit bias outside the vocabulary, a
        prompt over the context) fails here, in the caller's thread, with a clear error:
        an HTTP client gets a 400 rather than an error event inside a started stream.
        """
        check_open(self._closed, self.name)
        check_slots(request.n, self.config.parallel)
        for given in (request.state, request.context_state):
            if given is not None:
                self._check_state(given)
        prompt = self.tokenize_request(request)
        check_prompt(prompt, self.name, self.context_per_slot)
        Sampler(request.sampling, self.model.vocab, self.model.n_vocab, 0).free()
        return prompt

    async def generate(self, request: GenerateRequest) -> Completion:
        return await self.submit(request).completion()

    # -- work on the scheduler thread -------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler thread between two steps (it owns the context)."""
        if self._closed:
            raise EngineClosed(f"engine for {self.name!r} is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(Call(fn, future))
        return await asyncio.wrap_future(future)

    async def export_slot(self, seq_id: int) -> KVState:
        """The KV state of an idle slot (what its last request left there)."""
        return await self.call(lambda: self._scheduler.export_idle(seq_id))

    def _check_state(self, state: KVState) -> None:
        """StateError unless the state is this engine's kind and its tokens are this
        vocabulary's: a forged header with the right key must not hand llama.cpp ids it
        would index out of bounds."""
        state.check_compatible(self.compat_key)
        ids = [*state.tokens, *([state.next_token] if state.next_token is not None else [])]
        if any(not 0 <= t < self.model.n_vocab for t in ids):
            raise StateError("the state's tokens are outside this model's vocabulary")

    async def import_state(self, state: KVState) -> int:
        """Load a state into the idle slot with least to lose (an empty one, else the
        least recently used); returns its seq id."""
        self._check_state(state)
        return await self.call(lambda: self._scheduler.import_idle(state))

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
        return await self.call(lambda: [self._embedder.embed(t) for t in token_lists])

    async def clear_cache(self) -> int:
        """Drop the cached KV of every idle slot; returns how many tokens were dropped."""
        return await self.call(self._scheduler.clear_idle)

    # -- state (any thread) -------------------------------------------------------------

    def slots(self) -> list[SlotInfo]:
        return self._scheduler.slot_infos()

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache allocated for all slots: the device planner's figure
        (``OffloadPlan.kv_bytes``) for this model, context and ``parallel``."""
        return kv_cache_bytes(
            kv_shape(self.model, self.name),
            self.context_per_slot,
            self.config.parallel,
            self.config.type_k,
            self.config.type_v,
        )

    @property
    def closed(self) -> bool:
        """True once shut down, or after the scheduler thread died."""
        return self._closed

    @property
    def busy_slots(self) -> int:
        return self._scheduler.busy_slots

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queue_depth

    def close(self) -> None:
        """Stop the scheduler (pending requests fail with EngineClosed) and free memory."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(Close())
        self._thread.join()
        self._scheduler.free()
        self._embedder.close()
        llama_cpp.llama_free(self._ctx)
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the scheduler thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._scheduler.run()
        except BaseException:  # a bug there must not hang every caller forever
            log.exception("engine scheduler crashed")
            self._closed = True
            self._scheduler.shutdown(
                EngineClosed(f"the engine for {self.name!r} crashed; see the log")
            )
