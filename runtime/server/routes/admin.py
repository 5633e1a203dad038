"""Daemon routes beyond OpenAI's: health, Prometheus metrics, loaded models, unload."""

from __future__ import annotations

import os
from typing import Any

import psutil
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.server.services import DaemonState, services_of
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["router"]

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    services = services_of(request)
    status = 200 if services.state == DaemonState.SERVING else 503
    return JSONResponse({"status": services.state}, status_code=status)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body = services_of(request).metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/pcrt/ps")
async def ps(request: Request) -> dict[str, Any]:
    """What ``pcrt ps`` shows: loaded models, their memory, slots and keep-alive expiry."""
    services = services_of(request)
    rss = psutil.Process(os.getpid()).memory_info().rss
    return {
        "models": [m.describe() for m in services.pool.loaded()],
        "process_rss_bytes": rss,
        "state": services.state,
    }


@router.get("/v1/pcrt/cache")
async def cache(request: Request) -> dict[str, Any]:
    """The KV chunk store (``pcrt cache``): its tiers, what they saved, each loaded
    model's use of it."""
    services = services_of(request)
    chunks = services.chunks
    return {
        "enabled": chunks is not None,
        "store": chunks.stats().as_dict() if chunks is not None else None,
        "models": {m.name: m.engine.chunk_status for m in services.pool.loaded()},
    }


@router.delete("/v1/pcrt/cache")
async def clear_cache(request: Request) -> dict[str, Any]:
    """Empty the chunk store's tiers (``pcrt cache clear``); chunks an unfinished run
    needs stay."""
    chunks = services_of(request).chunks
    if chunks is None:
        return {"cleared_chunks": 0, "cleared_bytes": 0}
    entries, size = await to_thread_to_completion(chunks.clear)
    return {"cleared_chunks": entries, "cleared_bytes": size}


@router.get("/v1/pcrt/device")
async def device(request: Request) -> dict[str, Any]:
    """This machine's device profile for peers; live fields refresh every few seconds."""
    profile: dict[str, Any] = services_of(request).monitor.latest.model_dump(mode="json")
    return profile


@router.post("/v1/pcrt/stop")
async def stop(request: Request) -> dict[str, Any]:
    """Unload a model now (``pcrt stop MODEL``); running requests on it fail."""
    try:
        body = await request.json()
        name = body["model"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest('send {"model": NAME}') from None
    services = services_of(request)
    loaded = services.pool.get_loaded(str(name))  # an unknown name raises ModelNotFound (404)
    unloaded = await services.pool.unload(loaded.name) if loaded is not None else False
    return {"model": str(name), "unloaded": unloaded}
