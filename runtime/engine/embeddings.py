"""Embeddings: mean-pooled, L2-normalised vectors from a second, small llama.cpp context.

The generation context computes logits, not pooled embeddings, so the first embedding
request creates a one-sequence context with mean pooling beside it (sharing the model's
weights) and keeps it. ``Embedder.embed`` runs on the scheduler thread (``Engine.embed``
sends it there through ``Call``), between decode steps, like every other use of
llama.cpp contexts.
"""

from __future__ import annotations

import math
from typing import Any

import llama_cpp

from pcrt.runtime.engine.config import EngineConfig, new_context
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.errors import InvalidRequest, PcrtError

__all__ = ["Embedder"]


class Embedder:
    """The embedding context of one model, made on first use."""

    def __init__(
        self, model: LlamaModel, config: EngineConfig, context_per_slot: int, name: str
    ) -> None:
        self._model = model
        self._config = config
        self._context_per_slot = context_per_slot
        self._name = name
        self._ctx: Any = None

    def embed(self, tokens: list[int]) -> list[float]:
        """One text's tokens (at most ``context_per_slot``) to its unit vector."""
        if self._ctx is None:
            self._ctx = new_context(
                self._model, self._config, self._context_per_slot, name=self._name, embeddings=True
            )
        ctx = self._ctx
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
                raise InvalidRequest(f"model {self._name!r} gives no pooled embeddings")
            vec = ptr[: self._model.n_embd]
        finally:
            llama_cpp.llama_batch_free(batch)
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def close(self) -> None:
        """Free the context (after the scheduler thread has stopped)."""
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
