"""Ollama's model routes: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/pull`` and
``/api/delete``, answered from the registry, each GGUF's own metadata and the pool.

Names carry Ollama's ``:latest`` tag on the way out, as Ollama's clients compare them.
Reading a GGUF's header and pulling are file work: they run in worker threads. A pull
streams Ollama's progress lines (``pulling manifest``, ``pulling <digest>`` with
``total``/``completed``, ``verifying sha256 digest``, ``writing manifest``, ``success``);
a client that leaves mid-pull does not stop it (the next pull or first use finds the file,
or resumes its ``.part``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.responses import StreamingResponse

from pcrt.runtime.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    PcrtError,
    PullError,
)
from pcrt.runtime.models.gguf_info import GgufInfo, read_gguf_info, read_gguf_metadata
from pcrt.runtime.models.pull import pull, remove
from pcrt.runtime.models.registry import ModelEntry
from pcrt.runtime.server.http_errors import status_and_body
from pcrt.runtime.server.pool import LoadedModel
from pcrt.runtime.server.services import Services
from pcrt.runtime.server.serving.ollama_wire import FOREVER, iso, line, model_name
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["OllamaModels", "tagged"]

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 0.25  # at most this often a pull's progress line


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _parameter_size(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


def _details(info: GgufInfo) -> dict[str, Any]:
    quantization = (info.file_type or "").removeprefix("MOSTLY_").removeprefix("ALL_")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": _parameter_size(info.parameter_count),
        "quantization_level": quantization,
    }


def _capabilities(info: GgufInfo, metadata: dict[str, Any]) -> list[str]:
    """An embedding model's GGUF names a pooling type; other models chat, call tools in
    their family's format (or pcrt's generic one) and embed through ``/api/embed``."""
    if f"{info.architecture}.pooling_type" in metadata:
        return ["embedding"]
    return ["completion", "tools", "embedding"]


@dataclass(frozen=True)
class _Described:
    """A pulled model's file as ``/api/show`` and ``/api/tags`` describe it."""

    path: Path
    size: int
    modified: float
    info: GgufInfo | None  # None: the file does not read as GGUF
    metadata: dict[str, Any]


def _describe(path: Path, *, metadata: bool) -> _Described | None:
    """The file's description (file work: in a worker thread); None when it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    try:
        info: GgufInfo | None = read_gguf_info(path)
        found = read_gguf_metadata(path) if metadata else {}
    except ModelLoadError:
        info, found = None, {}
    return _Described(path, stat.st_size, stat.st_mtime, info, found)


class OllamaModels:
    def __init__(self, services: Services) -> None:
        self.services = services

    @property
    def _registry(self) -> Any:
        return self.services.pool.registry

    def _entry(self, name: str) -> ModelEntry:
        entry: ModelEntry = self._registry.resolve(model_name(name))
        return entry

    async def _described(self, name: str) -> tuple[ModelEntry, _Described]:
        entry = self._entry(name)
        path = self._registry.path_of(entry)
        described = await to_thread_to_completion(functools.partial(_describe, path, metadata=True))
        if described is None:
            raise ModelNotFound(f"model '{name}' not found: pull it first (POST /api/pull)")
        if described.info is None:
            raise ModelLoadError(f"{path} is not a readable GGUF file")
        return entry, described

    async def tags(self) -> dict[str, Any]:
        """Every pulled model, as ``ollama list`` shows them; one whose file does not read
        as GGUF is still listed (``/api/show`` says what is wrong with it)."""
        entries = list(self._registry.entries.values())
        found = await to_thread_to_completion(
            lambda: [_describe(self._registry.path_of(e), metadata=False) for e in entries]
        )
        return {
            "models": [
                self._listed(e, d) for e, d in zip(entries, found, strict=True) if d is not None
            ]
        }

    def _listed(self, entry: ModelEntry, described: _Described) -> dict[str, Any]:
        info = described.info
        return {
            "name": tagged(entry.name),
            "model": tagged(entry.name),
            "modified_at": iso(described.modified),
            "size": described.size,
            "digest": entry.sha256 or "",
            "details": _details(info) if info is not None else {"format": "gguf"},
        }

    async def show(self, name: str) -> dict[str, Any]:
        entry, described = await self._described(name)
        info, metadata = described.info, described.metadata
        assert info is not None  # _described refuses a file that does not read
        loaded = self.services.pool.get_loaded(entry.name)
        context = loaded.engine.context_per_slot if loaded else self.services.settings.context
        return {
            "license": str(metadata.get("general.license") or ""),
            "modelfile": f"# pcrt model {entry.name}\nFROM {described.path}\n",
            "parameters": f"num_ctx {context}",
            "template": info.chat_template or entry.chat_template or "",
            "details": _details(info),
            "model_info": {**metadata, "general.parameter_count": info.parameter_count},
            "capabilities": _capabilities(info, metadata),
            "modified_at": iso(described.modified),
        }

    async def ps(self) -> dict[str, Any]:
        loaded = self.services.pool.loaded()
        infos = await to_thread_to_completion(
            lambda: [read_gguf_info(m.engine.model.path) for m in loaded]
        )
        return {"models": [self._running(m, i) for m, i in zip(loaded, infos, strict=True)]}

    def _running(self, model: LoadedModel, info: GgufInfo) -> dict[str, Any]:
        engine = model.engine
        expires = model.expires_at()
        if expires is None:  # kept for good, or busy now: the keep-alive starts after
            expires = None if model.keep_alive < 0 else time.time() + model.keep_alive
        plan = engine.plan
        on_gpus = sum(g.total for g in plan.gpus) if plan is not None else 0
        return {
            "name": tagged(model.name),
            "model": tagged(model.name),
            "size": engine.model.size_bytes + engine.kv_bytes,
            "digest": model.entry.sha256 or "",
            "details": _details(info),
            "expires_at": FOREVER if expires is None else iso(expires),
            "size_vram": on_gpus,
            "context_length": engine.context_per_slot,
        }

    async def delete(self, name: str) -> None:
        entry = self._entry(name)
        try:
            removed = await to_thread_to_completion(remove, entry, self._registry.paths)
        except PullError as exc:  # a user's own file: pcrt never deletes it
            raise InvalidRequest(str(exc)) from None
        if not removed:
            raise ModelNotFound(f"model '{name}' not found")
        # the file is gone, the model goes once its generations end (a mapped file
        # outlives its name)
        await self.services.pool.unload_when_idle(entry.name)

    async def pull(self, name: str, streamed: bool) -> Any:
        entry = self._entry(name)
        if not streamed:
            await self._pull_now(entry, None)
            return {"status": "success"}
        return StreamingResponse(self._progress(entry), media_type="application/x-ndjson")

    async def _pull_now(self, entry: ModelEntry, queue: asyncio.Queue[Any] | None) -> Path:
        loop = asyncio.get_running_loop()

        def on_progress(done: int, total: int | None) -> None:
            if queue is not None:
                loop.call_soon_threadsafe(queue.put_nowait, (done, total))

        path: Path = await to_thread_to_completion(
            functools.partial(pull, entry, self._registry.paths, on_progress=on_progress)
        )
        return path

    async def _progress(self, entry: ModelEntry) -> AsyncGenerator[str, None]:
        digest = f"sha256:{entry.sha256 or ''}"
        pulling = f"pulling {(entry.sha256 or entry.name)[:12]}"
        yield line({"status": "pulling manifest"})
        queue: asyncio.Queue[Any] = asyncio.Queue()
        work = asyncio.ensure_future(self._pull_now(entry, queue))
        shown = 0.0
        try:
            while not work.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    continue
                completed, total = getter.result()
                if time.monotonic() - shown >= PROGRESS_SECONDS or completed == total:
                    shown = time.monotonic()
                    yield line(_pulling(pulling, digest, completed, total))
            path = work.result()
        except PcrtError as exc:
            _, body, _ = status_and_body(exc)
            yield line({"error": body["error"]["message"]})
            return
        finally:
            # a client that left: the pull goes on, and its outcome is only logged
            work.add_done_callback(_logged)
        size = path.stat().st_size
        yield line(_pulling(pulling, digest, size, size))
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield line({"status": status})


def _logged(work: asyncio.Future[Any]) -> None:
    if not work.cancelled() and work.exception() is not None:
        log.warning("a pull whose client left failed: %s", work.exception())


def _pulling(status: str, digest: str, completed: int, total: int | None) -> dict[str, Any]:
    line: dict[str, Any] = {"status": status, "digest": digest, "completed": completed}
    if total is not None:
        line["total"] = total
    return line
