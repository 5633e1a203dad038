"""Daemon routes beyond OpenAI's: health, Prometheus metrics, loaded models, unload."""

from __future__ import annotations

import datetime
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


# the dashboard's usage chart: a bucket from this list gives at most _BARS bars
_BUCKETS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
_BARS = 60
_LONGEST_WINDOW = 366 * 86400


@router.get("/v1/pcrt/usage")
async def usage(
    request: Request, window_s: int = 86400, bucket_s: int | None = None, agent: str | None = None
) -> dict[str, Any]:
    """Usage over the last ``window_s`` seconds: requests and tokens per agent in buckets
    of ``bucket_s`` (chosen for about 60 bars when not given), and the totals per agent
    and model that ``pcrt usage`` prints."""
    if not 60 <= window_s <= _LONGEST_WINDOW:
        raise InvalidRequest(f"window_s is 60 to {_LONGEST_WINDOW} seconds", param="window_s")
    if bucket_s is None:
        bucket_s = next((b for b in _BUCKETS if window_s / b <= _BARS), _BUCKETS[-1])
    if bucket_s < 1 or window_s / bucket_s > 1000:
        raise InvalidRequest("bucket_s gives at most 1,000 buckets of window_s", param="bucket_s")
    now = datetime.datetime.now(datetime.UTC)
    since = (now - datetime.timedelta(seconds=window_s)).isoformat(timespec="microseconds")
    log = services_of(request).usage
    series, totals = await to_thread_to_completion(
        lambda: log.over_time(since=since, bucket_seconds=bucket_s, agent=agent)
    )
    return {
        "since": since,
        "now": int(now.timestamp()),
        "window_s": window_s,
        "bucket_s": bucket_s,
        "series": series,
        "totals": totals,
    }


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
