"""Engines for a DAG run outside the daemon (``pcrt dag run`` with no daemon, tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pcrt.runtime.engine import Engine
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.registry import Registry

__all__ = ["LocalEngines"]


class LocalEngines:
    """Opens each model once, on first use, and keeps it until ``close``."""

    def __init__(self, registry: Registry, **engine_options: Any) -> None:
        self.registry = registry
        self.options = engine_options
        self._engines: dict[str, Engine] = {}
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Engine]:
        async with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                engine = await asyncio.to_thread(open_engine, self.registry, name, **self.options)
                self._engines[name] = engine
        yield engine

    async def clear_caches(self) -> None:
        """Forget every idle slot's KV (tests and benchmarks that must not reuse it)."""
        for engine in list(self._engines.values()):
            await engine.clear_cache()

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
