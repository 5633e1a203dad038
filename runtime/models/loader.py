"""From a model name to a running engine: resolve, pull on first use, hash, plan, load.

The offload plan (``pcrt.device.offload``) decides ``n_gpu_layers``, the context and the KV
cache types from this machine's device profile and the GGUF's metadata; the entry's pins
and explicit overrides win, and the plan says which values were pinned. The engine keeps
its plan as ``engine.plan``.
"""

from __future__ import annotations

import logging
from typing import Any

from pcrt.cache.chunks import ChunkStore
from pcrt.cache.store import Store
from pcrt.device.offload import OffloadPlan, PlanMargins, flash_attn_for
from pcrt.device.profile import DeviceProfile
from pcrt.runtime.engine import Engine, EngineConfig
from pcrt.runtime.errors import PlanUnavailable
from pcrt.runtime.models.hashing import file_sha256
from pcrt.runtime.models.planning import plan_for
from pcrt.runtime.models.pull import ProgressFactory, ensure_pulled
from pcrt.runtime.models.registry import ModelEntry, Registry

__all__ = ["engine_config_for", "engine_config_from_plan", "kv_settings_for", "open_engine"]

log = logging.getLogger(__name__)


def engine_config_for(entry: ModelEntry, **overrides: Any) -> EngineConfig:
    """The entry's pinned values, then explicit overrides (CLI flags) on top."""
    values: dict[str, Any] = {"context": entry.context}
    if entry.n_gpu_layers is not None:
        values["n_gpu_layers"] = entry.n_gpu_layers
    if entry.kv_type is not None:
        values["type_k"] = values["type_v"] = entry.kv_type
    if entry.flash_attn is not None:
        values["flash_attn"] = entry.flash_attn
    values.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig(**values)


def kv_settings_for(entry: ModelEntry) -> tuple[str, str, bool]:
    """The K and V cache types and flash attention a load of ``entry`` will use, known
    without loading it (peers compare them before sending KV states): the entry's pins over
    the engine's defaults. The planner changes neither type and decides flash attention by
    ``flash_attn_for``, as this does."""
    defaults = EngineConfig.model_fields  # not an EngineConfig: that counts the cores
    type_k = entry.kv_type or defaults["type_k"].default
    type_v = entry.kv_type or defaults["type_v"].default
    flash_attn = flash_attn_for(type_v, entry.flash_attn)
    return type_k, type_v, flash_attn


def engine_config_from_plan(entry: ModelEntry, plan: OffloadPlan, **overrides: Any) -> EngineConfig:
    """``engine_config_for`` with the planned values (the plan already honours the pins)."""
    base = engine_config_for(entry, **overrides)
    planned = {
        "n_gpu_layers": plan.n_gpu_layers,
        "context": plan.context,
        "type_k": plan.type_k,
        "type_v": plan.type_v,
        "flash_attn": plan.flash_attn,
        "main_gpu": plan.main_gpu,
        "tensor_split": plan.tensor_split,
    }
    return EngineConfig(**{**base.model_dump(), **planned})


def open_engine(
    registry: Registry,
    name: str | None,
    *,
    progress: ProgressFactory | None = None,
    store: Store | None = None,
    profile: DeviceProfile | None = None,
    margins: PlanMargins | None = None,
    chunks: ChunkStore | None = None,
    **overrides: Any,
) -> Engine:
    """Load a model with its offload plan. ``profile``: the machine to plan for (default:
    profiled now); ``margins``: the planner's reserves (default ``PlanMargins()``);
    ``chunks``: the KV chunk store the engine shares with the process's others."""
    entry = registry.resolve(name)
    path = ensure_pulled(entry, registry, progress=progress, store=store)
    # a configured sha256 was verified when the file was pulled; otherwise hash it (cached)
    sha256 = entry.sha256 or file_sha256(path, store)
    plan: OffloadPlan | None
    try:
        plan = plan_for(entry, path, profile=profile, margins=margins, **overrides)
        config = engine_config_from_plan(entry, plan, **overrides)
    except PlanUnavailable as exc:  # the metadata is too odd to plan: load as configured
        log.warning("%s; loading %s without an offload plan", exc, entry.name)
        plan, config = None, engine_config_for(entry, **overrides)
    engine = Engine(
        path,
        model_sha256=sha256,
        config=config,
        name=entry.name,
        chat_template=entry.chat_template,
        tool_format=entry.tool_format,
        chunks=chunks,
    )
    engine.plan = plan
    return engine
