"""``EngineClient``: what code outside the engine room uses of an engine, and no more.

Surveyed from the server (pool, routes, app), the DAG runner, the model loader and
benchmark, the CLI, ``bench`` and the tests: their uses of an engine are exactly the
members below (``slots``, ``export_slot`` and ``import_state``: the tests only).
``submit`` returns the concrete ``RequestHandle``: a fake builds one on an inbox of its own.
``Engine`` satisfies it (``tests/test_engine_protocol.py`` holds that under mypy and at
run time), and a fake engine for the server's tests can be written against it without
llama.cpp.

Left out on purpose: ``Engine.call`` (run a function on the scheduler thread); its only
users outside (``bench.engine`` and one test) pass functions that read the private
llama.cpp context, which a fake could not honour.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pcrt.runtime.engine.call_formats import CallFormat
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.chunk_cache import ChunkCache
from pcrt.runtime.engine.config import EngineConfig
from pcrt.runtime.engine.handoff import RequestHandle
from pcrt.runtime.engine.requests import Completion, GenerateRequest, SlotInfo
from pcrt.runtime.engine.state import CompatKey, KVState

if TYPE_CHECKING:
    from pcrt.device.offload import OffloadPlan

__all__ = ["ChatTemplate", "EngineClient", "EngineModel"]


class EngineModel(Protocol):
    """The loaded model as callers see it: where it is, its size, its tokenizer."""

    @property
    def path(self) -> Path: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def special_token(self, text: str) -> int | None:
        """The token ``text`` is when a grammar must name it as special, else None."""
        ...


class ChatTemplate(Protocol):
    @property
    def available(self) -> bool:
        """Whether chat messages can be rendered (the model has a chat template)."""
        ...

    @property
    def call_format(self) -> CallFormat:
        """How the model writes tool calls, found from its template."""
        ...

    @property
    def roles(self) -> frozenset[str]:
        """The roles besides user and assistant its template writes."""
        ...

    def render(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        *,
        generation_prompt: bool = True,
    ) -> str:
        """The prompt text of a conversation (``ChatRenderer.render``)."""
        ...


@runtime_checkable
class EngineClient(Protocol):
    """A loaded model that runs requests: what the server, the DAG runner, the loader and
    the CLI rely on."""

    # -- what is loaded -------------------------------------------------------------

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> EngineConfig: ...

    @property
    def plan(self) -> OffloadPlan | None: ...

    @property
    def compat_key(self) -> CompatKey:
        """What a KV state must match to load here."""
        ...

    @property
    def context_per_slot(self) -> int: ...

    @property
    def model(self) -> EngineModel: ...

    @property
    def chat(self) -> ChatTemplate: ...

    # -- requests ---------------------------------------------------------------------

    # ``tokenize_request`` and ``prepare`` block (templates, tokenizer, grammar: seconds
    # for a long prompt); on an event loop, await their ``_in_thread`` forms instead

    def tokenize_request(self, request: GenerateRequest) -> list[int]: ...

    async def tokenize_request_in_thread(self, request: GenerateRequest) -> list[int]: ...

    def prepare(self, request: GenerateRequest) -> list[int]: ...

    async def prepare_in_thread(self, request: GenerateRequest) -> list[int]: ...

    def submit(
        self, request: GenerateRequest, prepared: list[int] | None = None
    ) -> RequestHandle: ...

    async def generate(self, request: GenerateRequest) -> Completion: ...

    async def prepare_embeddings(
        self, texts: list[str], *, max_total_tokens: int | None = None, truncate: bool = False
    ) -> list[list[int]]: ...

    async def embed(
        self, texts: list[str], prepared: list[list[int]] | None = None
    ) -> list[list[float]]:
        """Cancelling the caller stops the embedding; closing the engine ends it."""
        ...

    # -- KV states and the prefix cache -----------------------------------------------

    async def import_state(self, state: KVState) -> int: ...

    async def export_slot(self, seq_id: int) -> KVState: ...

    async def clear_cache(self) -> int: ...

    def slots(self) -> list[SlotInfo]: ...

    # -- load and health --------------------------------------------------------------

    @property
    def kv_bytes(self) -> int: ...

    @property
    def chunk_cache(self) -> ChunkCache | None:
        """How this engine keeps states as chunks (None: it keeps them whole)."""
        ...

    @property
    def chunk_status(self) -> str:
        """Whether prompts' prefixes come from the KV chunk store ("on: ..."), or why not."""
        ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def busy_slots(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def __enter__(self) -> EngineClient: ...

    def __exit__(self, *_: object) -> None: ...
