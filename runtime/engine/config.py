"""How a model is loaded: ``EngineConfig``, and how it becomes a llama.cpp context.

``context`` is per slot: the engine asks llama.cpp for ``context x parallel`` cells split
into ``parallel`` separate KV streams (``kv_unified`` off, see ``scheduler``). The KV
cache types are the planner's ``KVType`` (one vocabulary with ``pcrt device plan``); what
they cost in bytes is the planner's business too (``pcrt.device.offload.row_bytes``).
"""

from __future__ import annotations

import os
from typing import Any

import llama_cpp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pcrt.device.offload import KVType
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.errors import ModelLoadError

__all__ = ["KV_TYPES", "EngineConfig", "default_threads", "new_context"]

KV_TYPES: dict[KVType, int] = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
"""The ggml type of each KV cache type an ``EngineConfig`` may name."""


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
    type_k: KVType = "f16"
    type_v: KVType = "f16"
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


def new_context(
    model: LlamaModel,
    config: EngineConfig,
    context_per_slot: int,
    *,
    name: str,
    embeddings: bool = False,
) -> Any:
    """A llama.cpp context for ``model``: the generation context (``parallel`` streams of
    ``context_per_slot`` cells), or with ``embeddings`` a one-sequence mean-pooling one."""
    params = llama_cpp.llama_context_default_params()
    if embeddings:
        params.n_ctx = context_per_slot
        params.n_batch = params.n_ubatch = context_per_slot
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    else:
        params.n_ctx = context_per_slot * config.parallel
        params.n_batch = params.n_ubatch = config.n_batch
        params.n_seq_max = config.parallel
        params.kv_unified = False
    params.n_threads = params.n_threads_batch = config.n_threads
    params.type_k = KV_TYPES[config.type_k]
    params.type_v = KV_TYPES[config.type_v]
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if config.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise ModelLoadError(
            f"llama.cpp could not create a context of {params.n_ctx} tokens for "
            f"{name!r} (out of memory, or an unsupported KV type / flash-attention mix)"
        )
    return ctx
