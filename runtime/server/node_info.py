"""What this node offers, for peers (``GET /v1/pcrt/node``) and for the routing policy.

Models come from the registry; loaded ones report their live queue and slots; speeds come
from ``pcrt bench`` results in the store (the newest run for that file on this machine),
else from the answers this node served recently (``UsageLog.served_speeds``);
battery and free memory from the device monitor. A model's strength is its file size in
GB, a rough proxy that orders models of one family and quantisation correctly. Each model
also carries the compatibility key its engine gives KV states (``routing.statekey``), so a
peer migrating a run here sends only states that will load.

Sizes and speeds are cached for ``facts_ttl`` seconds. The views are built on the event
loop (a routing decision, a peer's request), where a stale fact is not read in place (a
stat, two SQLite queries that may wait on another connection's commit): the view uses
what the cache holds and ``refresh`` reads every fact afresh in a worker thread for the
next one. The lifespan refreshes once before serving. Off the loop (tests, a worker
thread) a stale fact is read in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.device.monitor import DeviceMonitor
from pcrt.routing.discovery import PROTOCOL_VERSION
from pcrt.routing.policy import ModelOffer, NodeView
from pcrt.routing.statekey import EngineKey
from pcrt.runtime.engine.state import STATE_FORMAT_VERSION
from pcrt.runtime.models.loader import kv_settings_for
from pcrt.runtime.models.registry import ModelEntry, Registry
from pcrt.runtime.server.pool import ModelPool
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["NodeInfo"]

log = logging.getLogger(__name__)

_Key = tuple[str, str | None]  # ("size" or "speed", the model's name)


@dataclass
class NodeInfo:
    node_id: str
    name: str
    registry: Registry
    pool: ModelPool
    monitor: DeviceMonitor
    store: Store
    context_override: int | None = None  # pcrt serve --ctx: what a load will give
    parallel: int | None = None  # slots a load will give (the daemon's setting)
    addresses: frozenset[str] = frozenset()
    port: int = 0
    usage: UsageLog | None = None  # speeds measured on served answers, without a bench
    # the tools registered here, by name (never their URLs, headers or secrets): what a
    # DAG's tool and agent nodes need of the node they run on
    tools: frozenset[str] = frozenset()
    idempotent_tools: frozenset[str] = frozenset()  # of those, the ones safe to send twice

    # file sizes and measured speeds change rarely (a pull, a pcrt bench): read them at
    # most every few seconds, not on every routing decision
    _facts: dict[_Key, tuple[float, Any]] = field(default_factory=dict)
    facts_ttl: float = 5.0
    _refreshing: asyncio.Task[None] | None = None  # a refresh a view on the loop asked for
    _closed: bool = False

    async def refresh(self) -> None:
        """Read every model's size and speeds afresh, in one worker thread."""
        reads = self._reads()  # on the loop: the pool's models are the loop's to look at
        values = await to_thread_to_completion(lambda: {key: read() for key, read in reads})
        now = time.monotonic()
        self._facts.update((key, (now, value)) for key, value in values.items())

    async def close(self) -> None:
        """Stop refreshing; a refresh under way ends first (it reads the store)."""
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing

    def _reads(self) -> list[tuple[_Key, Callable[[], Any]]]:
        loaded = {m.name: m for m in self.pool.loaded()}
        reads: list[tuple[_Key, Callable[[], Any]]] = []
        for entry in self.registry.entries.values():
            model = loaded.get(entry.name)
            sha = model.engine.compat_key.model_sha256 if model else entry.sha256
            reads.append((("size", entry.name), functools.partial(self._read_size, entry)))
            reads.append(
                (("speed", entry.name), functools.partial(self._read_speeds, entry.name, sha))
            )
        return reads

    def _cached(self, key: _Key, read: Callable[[], Any], unknown: Any) -> Any:
        """The fact, read now if stale, except on the event loop: there, what the cache
        holds (``unknown`` before the first reading), and a refresh for the next view."""
        now = time.monotonic()
        hit = self._facts.get(key)
        if hit is not None and now - hit[0] < self.facts_ttl:
            return hit[1]
        if _on_event_loop():  # never wait on the disk or the store there
            self._refresh_soon()
            return unknown if hit is None else hit[1]
        value = read()
        self._facts[key] = (now, value)
        return value

    def _refresh_soon(self) -> None:
        if self._closed or (self._refreshing is not None and not self._refreshing.done()):
            return
        self._refreshing = asyncio.get_running_loop().create_task(
            self._refresh_logged(), name="pcrt-node-facts"
        )

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the cached facts stay; the next stale view asks again
            log.exception("could not refresh the models' sizes and speeds")

    def _file_size(self, entry: ModelEntry) -> int | None:
        size: int | None = self._cached(
            ("size", entry.name), functools.partial(self._read_size, entry), None
        )
        return size

    def _read_size(self, entry: ModelEntry) -> int | None:
        with contextlib.suppress(OSError):
            return os.stat(self.registry.path_of(entry)).st_size
        return None

    def _speeds(self, name: str, sha256: str | None) -> tuple[float | None, float | None]:
        speeds: tuple[float | None, float | None] = self._cached(
            ("speed", name), functools.partial(self._read_speeds, name, sha256), (None, None)
        )
        return speeds

    def _read_speeds(self, name: str, sha256: str | None) -> tuple[float | None, float | None]:
        """Decode and prefill tokens/s: the newest ``pcrt bench`` of the file, else what
        this node's recent answers with the model measured."""
        results = self.store.bench_results(sha256, limit=1) if sha256 else []
        if results:
            return results[0].decode_tps, results[0].prefill_tps
        if self.usage is not None:
            return self.usage.served_speeds(name)
        return None, None

    def offers(self) -> tuple[ModelOffer, ...]:
        loaded = {m.name: m for m in self.pool.loaded()}
        offers = []
        for entry in self.registry.entries.values():
            size = self._file_size(entry)
            model = loaded.get(entry.name)
            sha = model.engine.compat_key.model_sha256 if model else entry.sha256
            decode, prefill = self._speeds(entry.name, sha)
            offers.append(
                ModelOffer(
                    name=entry.name,
                    sha256=sha,
                    aliases=entry.aliases,
                    tags=entry.tags,
                    context=model.engine.context_per_slot
                    if model
                    else self.context_override or entry.context,
                    size_bytes=size,
                    strength=None if size is None else size / 1e9,
                    tokens_per_s=decode,
                    prefill_tokens_per_s=prefill,
                    loaded=model is not None,
                )
            )
        return tuple(offers)

    def state_key(self, name: str) -> EngineKey:
        """The key this node's engine gives the model's KV states: the engine's own once
        loaded, else what a load will use (the layout only a load can tell)."""
        entry = self.registry.entries[name]
        model = self.pool.get_loaded(name)
        if model is not None:
            return EngineKey.of(model.engine.compat_key, model.engine.config.parallel)
        type_k, type_v, flash_attn = kv_settings_for(entry)
        return EngineKey(
            type_k=type_k,
            type_v=type_v,
            flash_attn=flash_attn,
            llama_cpp_version=llama_cpp.__version__,
            format_version=STATE_FORMAT_VERSION,
            parallel=self.parallel,
        )

    def _load(self) -> tuple[int, int]:
        queue = busy = slots = 0
        for model in self.pool.loaded():
            queue += model.engine.queue_depth
            busy += model.engine.busy_slots
            slots += model.engine.config.parallel
        return queue, max(1, slots)

    def local_view(self) -> NodeView:
        profile = self.monitor.latest
        battery = profile.battery
        queue, slots = self._load()
        return NodeView(
            name="local",
            kind="local",
            models=self.offers(),
            queue_depth=queue,
            slots=slots,
            on_battery=battery is not None and battery.plugged_in is False,
            battery_percent=battery.percent if battery is not None else None,
            available_memory=profile.memory.available,
            tools=self.tools,
            idempotent_tools=self.idempotent_tools,
        )

    def info(self, state: str) -> dict[str, Any]:
        """The JSON a peer reads; everything but the TXT record's few fields lives here."""
        profile = self.monitor.latest
        queue, slots = self._load()
        battery = profile.battery
        return {
            "node_id": self.node_id,
            "name": self.name,
            # where it answers: a caller checks the URL it used is one of these
            "addresses": sorted(self.addresses),
            "port": self.port,
            "protocol": PROTOCOL_VERSION,
            "state": state,
            "models": [
                {
                    "name": o.name,
                    "sha256": o.sha256,
                    "aliases": list(o.aliases),
                    "tags": list(o.tags),
                    "context": o.context,
                    "size_bytes": o.size_bytes,
                    "strength": o.strength,
                    "tokens_per_s": o.tokens_per_s,
                    "prefill_tokens_per_s": o.prefill_tokens_per_s,
                    "loaded": o.loaded,
                    "state_key": self.state_key(o.name).to_info(),
                }
                for o in self.offers()
            ],
            "tools": sorted(self.tools),
            "idempotent_tools": sorted(self.idempotent_tools),
            "queue_depth": queue,
            "slots": slots,
            "battery": None if battery is None else battery.model_dump(mode="json"),
            "device": {
                "hostname": profile.hostname,
                "cpu": profile.cpu.model_dump(mode="json"),
                "memory_total": profile.memory.total,
                "memory_available": profile.memory.available,
                "gpus": [g.model_dump(mode="json") for g in profile.gpus],
            },
        }


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
