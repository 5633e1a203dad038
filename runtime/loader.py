"""From a model name to a running engine: resolve, pull on first use, hash, load."""

from __future__ import annotations

from typing import Any

from pcrt.cache.store import Store
from pcrt.runtime.engine import Engine, EngineConfig
from pcrt.runtime.hashing import file_sha256
from pcrt.runtime.models import ModelEntry, Registry
from pcrt.runtime.pull import ProgressFactory, ensure_pulled

__all__ = ["engine_config_for", "open_engine"]


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


def open_engine(
    registry: Registry,
    name: str | None,
    *,
    progress: ProgressFactory | None = None,
    store: Store | None = None,
    **overrides: Any,
) -> Engine:
    entry = registry.resolve(name)
    path = ensure_pulled(entry, registry, progress=progress, store=store)
    # a configured sha256 was verified when the file was pulled; otherwise hash it (cached)
    sha256 = entry.sha256 or file_sha256(path, store)
    return Engine(
        path,
        model_sha256=sha256,
        config=engine_config_for(entry, **overrides),
        name=entry.name,
        chat_template=entry.chat_template,
    )
