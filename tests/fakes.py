"""Fakes for tests where the model is not what they test.

``FakeEngine`` is an ``EngineClient`` (``pcrt.runtime.engine.protocol``) without llama.cpp:
a deterministic word tokenizer, answers taken from a queue (as the fake model in simonw/
llm's conftest), ``parallel`` slots and cancellation as the real engine has them. It
loads in no time and needs no model file, so the daemon's accounting (usage rows, rate
limits, metrics), its error shapes, its model pool and its forwarding to peers are tested
in the fast tier. Give ``FakeEngines`` to ``create_app`` (or ``LiveServer``) as its
``opener``: every model the daemon loads is then a ``FakeEngine`` reading the opener's
queue.

What a fake answers: the next queued reply (``enqueue("Hello", "!")``: one token per
piece, then ``stop``); with none queued, the words of ``FILLER`` over and over until
``max_tokens`` (``length``), like a model that never stops. Sampling (temperature, seed,
stop strings, grammars, logit bias) is ignored, KV states are refused, nothing is cached.
Embeddings go one text per ``token_seconds`` and stop, as the real engine's do, when their
caller is cancelled or the engine closes. ``prepare`` and the embeddings' checks run in a
worker thread when awaited (``prepare_in_thread``), as the real engine's do.
A test of what the real model generates, of prefix reuse, KV states or speed uses the
real engine.

``ManualClock`` is a monotonic clock that moves when told (``create_app(clock=...)``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcrt.device.offload import OffloadPlan
from pcrt.runtime.engine import (
    Choice,
    Completion,
    EngineClient,
    EngineConfig,
    FinishEvent,
    FinishReason,
    GenerateRequest,
    RequestHandle,
    SlotInfo,
    TokenEvent,
)
from pcrt.runtime.engine.call_formats import FORMATS
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.checks import check_open, check_prompt, check_slots
from pcrt.runtime.engine.grammar_compiler import check_compiles
from pcrt.runtime.engine.handoff import Cancel, Deliveries, Inbox, Outgoing
from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.errors import ContextLengthExceeded, EngineClosed, InvalidRequest, StateError
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["FILLER", "FakeEngine", "FakeEngines", "FakeModel", "ManualClock", "Script"]

FILLER = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
EMBEDDING_SIZE = 8
_PIECES = re.compile(r"\s*\S+|\s+")  # a word with the spaces before it; trailing spaces


class ManualClock:
    """A monotonic clock that moves only when told: rate limits without sleeping."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Script:
    """What fake engines answer, and how fast: shared by every engine of one opener."""

    replies: deque[tuple[str, ...]] = field(default_factory=deque)
    token_seconds: float = 0.0  # a pause before each token (0: as fast as the loop runs)
    # how long ``prepare`` blocks its thread (a slow template, tokenizer or grammar)
    prepare_seconds: float = 0.0

    def enqueue(self, *pieces: str) -> None:
        """The next request's answer, one token per piece."""
        self.replies.append(pieces)

    def next_reply(self) -> tuple[str, ...] | None:
        return self.replies.popleft() if self.replies else None


class FakeModel:
    """The loaded model as callers see it (``EngineModel``): a tokenizer of words."""

    eos_id = 0
    bos_id = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size_bytes = 0
        self._lock = threading.Lock()  # requests tokenize on the loop and in threads
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = ["</s>", "<s>", "<unk>"]

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return [self.token_of(piece) for piece in _PIECES.findall(text)]

    def token_of(self, piece: str) -> int:
        """The id of ``piece`` as one token (a new id the first time it is seen)."""
        with self._lock:
            known = self._ids.get(piece)
            if known is None:
                known = self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
            return known

    def detokenize(self, tokens: list[int]) -> str:
        with self._lock:
            return "".join(self._pieces[t] for t in tokens if 2 < t < len(self._pieces))

    def special_token(self, text: str) -> int | None:
        return None  # words only: no special tokens


class FakeChat:
    """A chat template that writes each message as ``<|role|>text``."""

    available = True
    call_format = FORMATS["generic"]  # no tool template
    roles = frozenset({"system", "tool"})

    def render(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        *,
        generation_prompt: bool = True,
    ) -> str:
        text = "".join(f"<|{m.role}|>{m.text()}\n" for m in messages)
        return text + "<|assistant|>" if generation_prompt else text


class FakeEngine:
    """An ``EngineClient`` that answers from a ``Script``; see the module docstring."""

    plan: OffloadPlan | None = None

    def __init__(
        self,
        name: str = "fake",
        config: EngineConfig | None = None,
        *,
        script: Script | None = None,
        model_sha256: str = "fa4e" * 16,
    ) -> None:
        self.name = name
        self.config = config or EngineConfig(parallel=2, context=512, n_threads=1)
        self.context_per_slot = self.config.context
        self.model = FakeModel(Path(f"/fake/{name}.gguf"))
        self.chat = FakeChat()
        self.compat_key = CompatKey(
            model_sha256=model_sha256,
            type_k=self.config.type_k,
            type_v=self.config.type_v,
            flash_attn=self.config.flash_attn,
        )
        self.script = script or Script()
        self.kv_bytes = 0
        self.chunk_status = "off: a fake engine"
        self.chunk_cache = None
        self._inbox: Inbox = Inbox()  # handles put their Cancel here, as the real engine's
        self._cancelled: set[str] = set()
        self._busy = 0
        self._waiting = 0
        self._free: asyncio.Semaphore | None = None  # made on the loop of the first request
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- requests ---------------------------------------------------------------------

    def tokenize_request(self, request: GenerateRequest) -> list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages")
        if request.messages is not None:
            tokens = self.model.tokenize(self.chat.render(request.messages))
        elif isinstance(request.prompt, str):
            tokens = self.model.tokenize(request.prompt)
        else:
            tokens = list(request.prompt or [])
        if request.state is not None:
            tokens = request.state.continuation + tokens
        return tokens

    async def tokenize_request_in_thread(self, request: GenerateRequest) -> list[int]:
        return await to_thread_to_completion(self.tokenize_request, request)

    def prepare(self, request: GenerateRequest) -> list[int]:
        """The real engine's checks that do not need a model: closed, ``n``, the length,
        the constraint (compiled without a vocabulary: the same refusals)."""
        time.sleep(self.script.prepare_seconds)
        check_open(self._closed, self.name)
        check_slots(request.n, self.config.parallel)
        constraint = request.sampling.constraint
        prompt = self.tokenize_request(request)
        check_prompt(prompt, self.name, self.context_per_slot)
        if constraint is not None:
            check_compiles(constraint)
        return prompt

    async def prepare_in_thread(self, request: GenerateRequest) -> list[int]:
        return await to_thread_to_completion(self.prepare, request)

    def submit(self, request: GenerateRequest, prepared: list[int] | None = None) -> RequestHandle:
        prompt = prepared if prepared is not None else self.prepare(request)
        handle = RequestHandle(self._inbox, request, prompt)
        task = asyncio.get_running_loop().create_task(self._answer(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def generate(self, request: GenerateRequest) -> Completion:
        prepared = await self.prepare_in_thread(request)
        return await self.submit(request, prepared).completion()

    async def _answer(self, handle: RequestHandle) -> None:
        """What the scheduler thread does for one request, on the caller's loop."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.config.parallel)
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:
            self._waiting -= 1
        self._busy += 1
        try:
            _send(handle, await self._run(handle))
        except Exception as exc:
            _send(handle, [exc])
        finally:
            self._busy -= 1
            self._free.release()

    async def _run(self, handle: RequestHandle) -> list[Outgoing]:
        request = handle.request
        started = time.perf_counter()
        reply = self.script.next_reply()
        room = self.context_per_slot - len(handle.prompt_tokens)
        limit = max(0, min(request.sampling.max_tokens, room))
        reason: FinishReason
        if reply is not None and len(reply) < limit:
            pieces, reason = list(reply), "stop"
        else:
            pieces = list(reply or (FILLER * math.ceil(limit / len(FILLER))))[:limit]
            reason = "length"
        tokens = [self.model.token_of(piece) for piece in pieces]
        first: float | None = None
        for i, (piece, token) in enumerate(zip(pieces, tokens, strict=True)):
            await asyncio.sleep(self.script.token_seconds)
            if self._closed:
                raise EngineClosed(f"engine for {self.name!r} is shut down")
            if self._was_cancelled(handle.id):
                pieces, tokens, reason = pieces[:i], tokens[:i], "cancelled"
                break
            first = first or time.perf_counter()
            _send(handle, [TokenEvent(index, piece, token) for index in range(request.n)])
        text = "".join(pieces)
        choices = [Choice(i, text, list(tokens), reason) for i in range(request.n)]
        finishes: list[Outgoing] = [FinishEvent(c.index, reason, text) for c in choices]
        done = time.perf_counter()
        return [
            *finishes,
            Completion(
                id=request.id,
                choices=choices,
                prompt_tokens=len(handle.prompt_tokens),
                cached_tokens=0,
                completion_tokens=len(tokens) * request.n,
                t_submitted=handle.t_submitted,
                t_first_token=first,
                t_done=done,
                prompt_seconds=(first or done) - started,
            ),
        ]

    def _was_cancelled(self, request_id: str) -> bool:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, Cancel):
                self._cancelled.add(message.request_id)
        return request_id in self._cancelled

    async def prepare_embeddings(
        self, texts: list[str], *, max_total_tokens: int | None = None, truncate: bool = False
    ) -> list[list[int]]:
        check_open(self._closed, self.name)
        return await to_thread_to_completion(
            self._tokenize_inputs, texts, max_total_tokens, truncate
        )

    def _tokenize_inputs(
        self, texts: list[str], max_total_tokens: int | None, truncate: bool
    ) -> list[list[int]]:
        """The real engine's checks, in its order: each text's length (or its cut, with
        ``truncate``), then the total."""
        inputs: list[list[int]] = []
        for i, text in enumerate(texts):
            tokens = self.model.tokenize(text, parse_special=False)
            if truncate:
                tokens = tokens[: self.context_per_slot]
            if not tokens:
                raise InvalidRequest(f"input {i} is empty")
            if len(tokens) > self.context_per_slot:
                raise ContextLengthExceeded(
                    f"input {i} has {len(tokens)} tokens; at most {self.context_per_slot}"
                )
            inputs.append(tokens)
            total = sum(map(len, inputs))
            if max_total_tokens is not None and total > max_total_tokens:
                raise InvalidRequest(
                    f"the inputs take at least {total} tokens; one request embeds at most "
                    f"{max_total_tokens}: split them over several requests"
                )
        return inputs

    async def embed(
        self, texts: list[str], prepared: list[list[int]] | None = None
    ) -> list[list[float]]:
        """A unit vector per text, from its hash: the same text, the same vector; one text
        per ``token_seconds``, so a cancelled caller or a close stops it between texts."""
        if prepared is None:
            await self.prepare_embeddings(texts)
        vectors: list[list[float]] = []
        for text in texts:
            await asyncio.sleep(self.script.token_seconds)
            if self._closed:
                raise EngineClosed(f"engine for {self.name!r} is shut down")
            vectors.append(_unit_vector(text))
        return vectors

    # -- KV states: a fake holds none ---------------------------------------------------

    async def import_state(self, state: KVState) -> int:
        raise StateError("a fake engine holds no KV states")

    async def export_slot(self, seq_id: int) -> KVState:
        raise StateError("a fake engine holds no KV states")

    async def clear_cache(self) -> int:
        return 0

    def slots(self) -> list[SlotInfo]:
        return [SlotInfo(i, i < self._busy, 0) for i in range(self.config.parallel)]

    # -- load and health --------------------------------------------------------------

    @property
    def busy_slots(self) -> int:
        return self._busy

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Requests under way end with ``EngineClosed`` at their next token."""
        self._closed = True

    def __enter__(self) -> FakeEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class FakeEngines(Script):
    """An opener for ``create_app(opener=...)``: each model the daemon loads is a
    ``FakeEngine`` named after its registry entry, reading this script."""

    opened: list[FakeEngine] = field(default_factory=list)

    def __call__(
        self,
        registry: Registry,
        name: str | None,
        *,
        parallel: int = 4,
        context: int | None = None,
        n_threads: int | None = None,
        **_: Any,
    ) -> EngineClient:
        entry = registry.resolve(name)
        config = EngineConfig(
            parallel=parallel, context=context or entry.context, n_threads=n_threads or 1
        )
        sha256 = entry.sha256 or hashlib.sha256(entry.name.encode()).hexdigest()
        engine = FakeEngine(entry.name, config, script=self, model_sha256=sha256)
        self.opened.append(engine)
        return engine


def _send(handle: RequestHandle, items: list[Outgoing]) -> None:
    """Hand events to the handle's loop the way the real scheduler does."""
    deliveries = Deliveries()
    deliveries.send(handle, items)
    deliveries.dispatch()


def _unit_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
