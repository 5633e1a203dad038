"""Loaded models of the daemon: load on first use, keep alive, evict, unload.

As in Ollama, a model stays loaded for a keep-alive after its last request (per request
``keep_alive``: 0 unloads when the request ends, a negative value keeps it forever). A
limit on loaded models evicts the least recently used idle one. Each model admits its
``parallel`` slots plus a bounded queue; beyond that a request is refused at once
(``Overloaded``), never left waiting without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pcrt.runtime.engine import EngineClient
from pcrt.runtime.errors import Overloaded
from pcrt.runtime.models.registry import ModelEntry, Registry
from pcrt.runtime.server.settings import ServerSettings

__all__ = ["LoadedModel", "ModelPool"]

log = logging.getLogger(__name__)

EngineOpener = Callable[..., EngineClient]


@dataclass(eq=False)
class LoadedModel:
    entry: ModelEntry
    engine: EngineClient
    keep_alive: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0

    @property
    def name(self) -> str:
        return self.entry.name

    def expires_at(self) -> float | None:
        """Wall-clock time of unloading if it stays idle; None: never, or busy now."""
        if self.keep_alive < 0 or self.in_flight:
            return None
        return time.time() + self.keep_alive - (time.monotonic() - self.last_used)

    def describe(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "name": self.name,
            "model_sha256": engine.compat_key.model_sha256,
            "path": str(engine.model.path),
            "size_bytes": engine.model.size_bytes,
            "kv_bytes": engine.kv_bytes,
            "kv_chunks": engine.chunk_status,
            "parallel": engine.config.parallel,
            "context": engine.context_per_slot,
            "busy_slots": engine.busy_slots,
            "queue_depth": engine.queue_depth,
            "in_flight": self.in_flight,
            "loaded_at": self.loaded_at,
            "expires_at": self.expires_at(),
        }


class ModelPool:
    def __init__(
        self,
        registry: Registry,
        settings: ServerSettings,
        opener: EngineOpener,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._open = opener
        self._models: dict[str, LoadedModel] = {}
        self._load_lock = asyncio.Lock()
        self._draining = False

    # -- leases -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str | None, keep_alive: float | None = None, *, while_draining: bool = False
    ) -> AsyncIterator[LoadedModel]:
        """The loaded model for one request; admission control happens here.
        ``while_draining``: work already admitted (a DAG run's next node) goes on."""
        if self._draining and not while_draining:
            raise Overloaded("the daemon is shutting down", retry_after=5)
        entry = self.registry.resolve(name)
        model = await self._get(entry)
        limit = model.engine.config.parallel + self.settings.queue_size
        if model.in_flight >= limit:
            raise Overloaded(
                f"{entry.name!r} has {model.in_flight} requests running or queued (limit "
                f"{limit}); retry shortly",
                retry_after=1 + model.engine.queue_depth // max(1, model.engine.config.parallel),
            )
        if keep_alive is not None:
            model.keep_alive = keep_alive
        model.in_flight += 1
        try:
            yield model
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()
            if model.keep_alive == 0 and model.in_flight == 0:
                await self.unload(entry.name)

    async def _get(self, entry: ModelEntry) -> LoadedModel:
        model = self._models.get(entry.name)
        if model is not None and not model.engine.closed:
            return model
        # one load at a time: the loaded-model limit counts loads in progress too
        async with self._load_lock:
            model = self._models.get(entry.name)
            if model is not None and model.engine.closed:  # its scheduler died: replace it
                log.error("the engine of %s had stopped; loading it again", entry.name)
                self._models.pop(entry.name)
                model = None
            if model is not None:
                return model
            await self._make_room()
            engine = await asyncio.to_thread(
                self._open,
                self.registry,
                entry.name,
                parallel=self.settings.parallel,
                context=self.settings.context,
                n_threads=self.settings.n_threads,
            )
            model = LoadedModel(entry, engine, keep_alive=self.settings.keep_alive)
            self._models[entry.name] = model
            log.info("loaded %s", entry.name)
            return model

    async def _make_room(self) -> None:
        while len(self._models) >= self.settings.max_loaded_models:
            idle = [m for m in self._models.values() if m.in_flight == 0]
            if not idle:
                raise Overloaded(
                    f"all {len(self._models)} loaded models are busy and the limit is "
                    f"{self.settings.max_loaded_models}; retry shortly",
                    retry_after=2,
                )
            victim = min(idle, key=lambda m: m.last_used)
            log.info("evicting %s to make room", victim.name)
            await self.unload(victim.name)

    # -- lifecycle ------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def get_loaded(self, name: str) -> LoadedModel | None:
        entry = self.registry.resolve(name)
        return self._models.get(entry.name)

    async def unload_when_idle(self, name: str) -> bool:
        """Unload now when nothing runs on the model, else once its last request ends
        (its keep-alive becomes 0): a client's unload never cuts another's generation.
        False when it was not loaded."""
        model = self._models.get(name)
        if model is None:
            return False
        if model.in_flight:
            model.keep_alive = 0  # the last lease to end unloads it
            return True
        return await self.unload(name)

    async def unload(self, name: str) -> bool:
        model = self._models.pop(name, None)
        if model is None:
            return False
        await asyncio.to_thread(model.engine.close)
        log.info("unloaded %s", name)
        return True

    async def reap_forever(self, interval: float = 1.0) -> None:
        """Background task: unload models idle for longer than their keep-alive."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for model in self.loaded():
                idle = now - model.last_used
                if model.in_flight == 0 and 0 <= model.keep_alive <= idle:
                    await self.unload(model.name)

    def start_draining(self) -> None:
        self._draining = True

    @property
    def in_flight(self) -> int:
        return sum(m.in_flight for m in self._models.values())

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)
