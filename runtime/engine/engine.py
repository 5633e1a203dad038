"""The engine: one loaded model, one llama.cpp context, continuous batching over slots.

``Engine`` is the facade callers use. It loads the model and its chat template, creates
the context, and starts the one scheduler thread that owns that context from then on
(``scheduler``). Its methods run on the caller's thread or event loop and never block it:

- checks and tokenization (``prepare``, ``tokenize_request``, ``prepare_embeddings``)
  run before any work, so a bad request fails first (an HTTP client gets a 400, not an
  error mid-stream); they can take seconds, so a caller on an event loop awaits them in a
  worker thread (``prepare_in_thread``, ``tokenize_request_in_thread``), once per request;
- ``submit`` queues a request and returns its ``RequestHandle`` (``handoff``): iterate it
  for events, or await ``completion()``;
- everything that touches the context (``export_slot``, ``import_state``,
  ``clear_cache``, ``embed``, ``call``) is sent to the scheduler thread and awaited;
  ``embed`` goes one text per step, between decode steps, and stops when its caller does.

The modules behind it, one job each: ``requests`` (the public types), ``config`` (how a
model is loaded), ``prepare`` (templates, tokens and checks before any work), ``bounds``
(how few tokens a text can take), ``handoff`` (messages in, events out), ``slots`` (what
a slot holds), ``prefix`` (which slot, which prefix to reuse: pure), ``kv`` (a slot's KV
in and out, the cache's size), ``scheduler`` (admission, the decode step, sampling, the
embedding steps), ``embeddings``.
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

from pcrt.cache.chunks import ChunkStore
from pcrt.runtime.engine.chat import ChatRenderer
from pcrt.runtime.engine.checks import check_open
from pcrt.runtime.engine.chunk_cache import ChunkCache, self_test
from pcrt.runtime.engine.config import EngineConfig, new_context
from pcrt.runtime.engine.embeddings import Embedder
from pcrt.runtime.engine.handoff import (
    Call,
    Close,
    Embed,
    EmbeddingJob,
    Inbox,
    RequestHandle,
    Submit,
)
from pcrt.runtime.engine.kv import SlotKV, has_portable_state, kv_cache_bytes, kv_shape
from pcrt.runtime.engine.kv_chunks import KvLayoutError
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.engine.prepare import Preparer
from pcrt.runtime.engine.requests import Completion, GenerateRequest, SlotInfo
from pcrt.runtime.engine.scheduler import Scheduler
from pcrt.runtime.engine.slots import Slot
from pcrt.runtime.engine.state import PORTABLE_LAYOUT, CompatKey, KVState, raw_layout
from pcrt.runtime.errors import EngineClosed, PcrtError
from pcrt.runtime.threads import to_thread_to_completion

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
        tool_format: str | None = None,
        chunks: ChunkStore | None = None,
    ) -> None:
        """``chunks``: the process's KV chunk store, which this engine restores prompts'
        prefixes from and spills its slots into (when its self-test passes)."""
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
                call_format=tool_format,
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
        self._preparer = Preparer(
            self.model,
            self.chat,
            name=self.name,
            context_per_slot=self.context_per_slot,
            parallel=self.config.parallel,
            compat_key=self.compat_key,
        )
        self._embedder = Embedder(self.model, self.config, self.context_per_slot, self.name)
        # the KV chunk store as this engine uses it (None: whole states only); any thread.
        # Set by the scheduler thread before it serves (its self-test decodes, see _run)
        self.chunk_cache: ChunkCache | None = None
        self._inbox: Inbox = Inbox()
        self._scheduler = Scheduler(
            self._ctx,
            model=self.model,
            config=self.config,
            context_per_slot=self.context_per_slot,
            kv=kv,
            grammars=self._preparer.grammars,
            inbox=self._inbox,
            name=self.name,
            embed=self._embedder.embed,
        )
        self._closed = False
        self._sending = threading.Lock()  # see _send
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run,
            args=(chunks, kv, started),
            name=f"pcrt-engine-{self.name}",
            daemon=True,
        )
        self._thread.start()
        started.result()  # the chunk store's self-test has run: chunk_status is final

    chunk_status: str = "off: no chunk store"
    """Whether prompts' prefixes come from the KV chunk store, and why not (``pcrt ps``)."""

    def _chunk_cache(self, store: ChunkStore, kv: SlotKV) -> ChunkCache | None:
        """The engine's use of the chunk store, after ``self_test`` (on slot 0, on the
        scheduler thread before it serves anything)."""
        try:
            layout = self_test(
                self._ctx,
                kv,
                Slot(0),
                n_batch=self.config.n_batch,
                n_vocab=self.model.n_vocab,
                chunk_tokens=store.chunk_tokens,
            )
        except (KvLayoutError, PcrtError) as exc:
            self.chunk_status = f"off: {exc}"
            log.warning("%s keeps whole KV states, not chunks: %s", self.name, exc)
            return None
        self.chunk_status = f"on: {store.chunk_tokens}-token chunks"
        return ChunkCache(
            store,
            compat_key=self.compat_key,
            layers=layout.layers,
            kv=kv,
            model_name=self.name,
        )

    # -- requests (the caller's thread or event loop) ---------------------------------

    def tokenize_request(self, request: GenerateRequest) -> list[int]:
        """The prompt tokens a request will run, after its chat template and state
        (``ContextLengthExceeded`` when they cannot fit). Blocks: see ``prepare``."""
        return self._preparer.tokenize_request(request)

    async def tokenize_request_in_thread(self, request: GenerateRequest) -> list[int]:
        """``tokenize_request`` in a worker thread: what an event loop awaits."""
        return await to_thread_to_completion(self.tokenize_request, request)

    def submit(self, request: GenerateRequest, prepared: list[int] | None = None) -> RequestHandle:
        """Validate and queue a request. Must be called from a running event loop.

        ``prepared``: the tokens ``prepare(request)`` returned for this same request, when
        the caller already ran the checks (the API does, before charging rate limits), so
        the template, tokenizer and grammar are not run twice.
        """
        prompt = prepared if prepared is not None else self.prepare(request)
        handle = RequestHandle(self._inbox, request, prompt)
        constraint = request.sampling.constraint
        if constraint is not None:  # held by the request: a long queue cannot evict it
            handle.grammar = self._preparer.grammars.cached(constraint)
        self._send(Submit(handle))
        return handle

    def prepare(self, request: GenerateRequest) -> list[int]:
        """Every check a request can fail before any work, and its prompt tokens.

        Bad input (a grammar that does not parse, a logit bias outside the vocabulary, a
        prompt over the context) fails here, in the caller's thread, with a clear error:
        an HTTP client gets a 400 rather than an error event inside a started stream.
        It blocks for as long as the template, the tokenizer and the grammar take (a long
        prompt, a large grammar: seconds), so an event loop calls ``prepare_in_thread``.
        """
        check_open(self._closed, self.name)
        return self._preparer.prepare(request)

    async def prepare_in_thread(self, request: GenerateRequest) -> list[int]:
        """``prepare`` in a worker thread, for callers on an event loop. A cancelled caller
        waits for the thread to end (it reads the model, which must outlive it)."""
        return await to_thread_to_completion(self.prepare, request)

    async def generate(self, request: GenerateRequest) -> Completion:
        prepared = await self.prepare_in_thread(request)
        return await self.submit(request, prepared).completion()

    # -- work on the scheduler thread -------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler thread between two steps (it owns the context)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send(Call(fn, future))
        return await asyncio.wrap_future(future)

    async def export_slot(self, seq_id: int) -> KVState:
        """The KV state of an idle slot (what its last request left there)."""
        return await self.call(lambda: self._scheduler.export_idle(seq_id))

    async def import_state(self, state: KVState) -> int:
        """Load a state into the idle slot with least to lose (an empty one, else the
        least recently used); returns its seq id."""
        self._preparer.check_state(state)
        return await self.call(lambda: self._scheduler.import_idle(state))

    async def prepare_embeddings(
        self, texts: list[str], *, max_total_tokens: int | None = None, truncate: bool = False
    ) -> list[list[int]]:
        """The tokens of each text to embed, in a worker thread: none empty, none over
        the context (``ContextLengthExceeded``; ``truncate``: cut to it instead), at most
        ``max_total_tokens`` in all."""
        check_open(self._closed, self.name)
        return await to_thread_to_completion(
            self._preparer.tokenize_inputs, texts, max_total_tokens, truncate
        )

    async def embed(
        self, texts: list[str], prepared: list[list[int]] | None = None
    ) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings, one per text.

        ``prepared``: what ``prepare_embeddings(texts)`` returned, when the caller already
        ran the checks. The texts are embedded one per scheduler step, between decode
        steps; cancelling the caller stops the job after the text under way, and
        ``close`` ends it with ``EngineClosed``."""
        inputs = prepared if prepared is not None else await self.prepare_embeddings(texts)
        if not inputs:
            return []
        job = EmbeddingJob(inputs)
        self._send(Embed(job))
        return await asyncio.wrap_future(job.future)

    def _send(self, message: Submit | Call[T] | Embed) -> None:
        """Into the inbox, unless closed: under the lock ``close`` takes, so a message is
        either in before ``Close`` (and answered, if only with EngineClosed) or refused."""
        with self._sending:
            check_open(self._closed, self.name)
            self._inbox.put(message)

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
        with self._sending:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(Close())
        self._preparer.users.close()  # prepares under way in other threads end first
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

    def _run(
        self,
        chunks: ChunkStore | None,
        kv: SlotKV,
        started: concurrent.futures.Future[None],
    ) -> None:
        # The self-test decodes, so it runs here, on the thread every later decode runs
        # on: llama.cpp's OpenMP keeps a team of worker threads per calling thread, and a
        # second team (one decode on the constructing thread) cost every later decode a
        # third of its speed (bench.http: 130 -> 80 tok/s, one stream, 2 threads).
        try:
            if chunks is not None:
                self.chunk_cache = self._chunk_cache(chunks, kv)
                self._scheduler.use_chunks(self.chunk_cache)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            self._scheduler.run()
        except BaseException:  # a bug there must not hang every caller forever
            log.exception("engine scheduler crashed")
            with self._sending:
                self._closed = True
            self._scheduler.shutdown(
                EngineClosed(f"the engine for {self.name!r} crashed; see the log")
            )
