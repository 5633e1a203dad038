"""The runtime side of offload planning: GGUF metadata and model entries to planner input.

``pcrt.device.offload`` is pure and knows nothing of GGUF files or ``models.toml``; this
module adapts a ``GgufInfo`` into a ``ModelShape`` and an entry plus CLI flags into a
``PlanRequest`` with its pins:

- an entry pins what its ``models.toml`` table sets: ``n_gpu_layers``, ``kv_type`` (both K
  and V), ``flash_attn`` and ``context`` (only when the table gives one; an entry without it
  wants the default and lets the planner shrink it);
- an explicit override (a CLI flag, a daemon setting) pins that value and wins over the
  entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pcrt.device.offload import (
    DeviceMemory,
    ModelShape,
    OffloadPlan,
    PlanError,
    PlanMargins,
    PlanRequest,
    plan_offload,
)
from pcrt.device.profile import DeviceProfile, collect_profile
from pcrt.runtime.engine import EngineConfig
from pcrt.runtime.errors import ModelLoadError, PlanUnavailable
from pcrt.runtime.models.gguf_info import GgufInfo, read_gguf_info
from pcrt.runtime.models.registry import ModelEntry

__all__ = ["model_shape", "plan_for", "plan_request"]

log = logging.getLogger(__name__)


def model_shape(info: GgufInfo, name: str = "") -> ModelShape:
    """The planner's view of a GGUF: dimensions and bytes per offloadable layer."""
    tb = info.tensor_bytes
    n_layers = info.block_count or len(tb.per_block)
    missing = [
        key
        for key, value in (
            ("block_count", n_layers),
            ("embedding_length", info.embedding_length),
            ("attention.head_count", info.head_count),
            ("vocab size", info.vocab_size),
        )
        if not value
    ]
    if missing:
        raise PlanUnavailable(f"{info.path}: cannot plan offload, the GGUF lacks {missing}")
    assert info.embedding_length and info.head_count and info.vocab_size  # for mypy
    per_block = tuple(tb.per_block) + (0,) * max(0, n_layers - len(tb.per_block))
    head_dim = info.embedding_length // info.head_count
    return ModelShape(
        name=name or info.name or Path(info.path).stem,
        architecture=info.architecture,
        n_layers=n_layers,
        n_embd=info.embedding_length,
        n_head=info.head_count,
        n_head_kv=info.head_count_kv if info.head_count_kv is not None else info.head_count,
        head_dim_k=info.key_length or head_dim,
        head_dim_v=info.value_length or head_dim,
        n_vocab=info.vocab_size,
        n_ctx_train=info.context_length,
        layer_bytes=per_block[:n_layers],
        output_bytes=tb.output,
        token_embd_bytes=tb.token_embd,
        other_bytes=tb.other,
        tied_embeddings=info.tied_embeddings,
    )


def plan_request(entry: ModelEntry, **overrides: Any) -> PlanRequest:
    """The entry's pins, then explicit overrides (pins too) on top.

    Overrides use ``EngineConfig`` names (``context``, ``parallel``, ``n_batch``,
    ``type_k``, ``type_v``, ``flash_attn``, ``n_gpu_layers``); None means not given.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    defaults = EngineConfig.model_fields
    pinned: set[str] = set()
    values: dict[str, Any] = {
        "context": entry.context,
        "parallel": given.get("parallel", defaults["parallel"].default),
        "n_batch": given.get("n_batch", defaults["n_batch"].default),
    }
    if "context" in entry.model_fields_set:
        pinned.add("context")
    if entry.n_gpu_layers is not None:
        values["n_gpu_layers"] = entry.n_gpu_layers
    if entry.kv_type is not None:
        values["type_k"] = values["type_v"] = entry.kv_type
        pinned.update(("type_k", "type_v"))
    if entry.flash_attn is not None:
        values["flash_attn"] = entry.flash_attn
    for key in ("context", "type_k", "type_v", "flash_attn", "n_gpu_layers"):
        if key in given:
            values[key] = given[key]
            pinned.add(key)
    return PlanRequest(**values, pinned=frozenset(pinned))


def plan_for(
    entry: ModelEntry,
    path: Path,
    *,
    profile: DeviceProfile | None = None,
    margins: PlanMargins | None = None,
    info: GgufInfo | None = None,
    **overrides: Any,
) -> OffloadPlan:
    """The plan for loading ``entry`` (its GGUF at ``path``) on ``profile``'s machine
    (this one when None). A model that cannot fit raises ``ModelLoadError``."""
    info = info or read_gguf_info(path)
    shape = model_shape(info, entry.name)
    profile = profile or collect_profile()
    request = plan_request(entry, **overrides)
    try:
        plan = plan_offload(shape, DeviceMemory.from_profile(profile), request, margins)
    except PlanError as exc:
        raise ModelLoadError(str(exc)) from None
    log.info("offload plan for %s: %s", entry.name, plan.reason)
    for note in plan.notes:
        log.info("offload plan for %s: %s", entry.name, note)
    return plan
