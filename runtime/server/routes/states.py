"""KV-state routes: list, download, upload and delete the daemon's state blobs.

These are how a run's states move between daemons (migration): the source answers GET
with the blob and its compatibility key; the target's PUT verifies the payload hash and,
given ``?model=NAME``, the key against that model's engine before it stores anything.

Blob reads, writes and hashing run in worker threads, never on the event loop. An upload
is bounded by its Content-Length and again while it streams, so a chunked or lying
client cannot make the daemon buffer more than ``state_upload_max_bytes``.

    GET    /v1/states            list: id, size, kind, run, times, model, tokens, key
    GET    /v1/states/{id}       the blob (octet-stream) + X-PCRT-State-Key / -Tokens
    PUT    /v1/states[?model=M]  upload raw blob bytes -> 201 {"id": sha256, ...}
    DELETE /v1/states/{id}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from pcrt.cache.blobs import BlobCorrupt, BlobMissing, BlobStore
from pcrt.runtime.engine.chunk_cache import whole_state
from pcrt.runtime.engine.state import (
    ChunkedState,
    KVState,
    StateHeader,
    describe_state,
    is_chunked_blob,
)
from pcrt.runtime.errors import (
    BadContentLength,
    BodyTooLarge,
    EmptyBody,
    IncompatibleState,
    StateCorrupt,
    StateError,
    StateNotFound,
    StateTooLarge,
)
from pcrt.runtime.server.services import services_of
from pcrt.runtime.server.uploads import disk_errors, receive_into
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter()


def _list(blobs: BlobStore, run_id: str | None) -> list[dict[str, Any]]:
    listed = []
    for info in blobs.entries(run_id=run_id):
        if not blobs.has(info.sha256):  # indexed, but the file is gone
            continue
        try:
            header: StateHeader | None = KVState.read_header(blobs.path_of(info.sha256))
            problem = None
        except (StateError, OSError) as exc:
            header, problem = None, str(exc)
        listed.append(describe_state(info, header, problem))
    return listed


@router.get("/v1/states")
async def list_states(request: Request, run_id: str | None = None) -> dict[str, Any]:
    """Every stored state (of one run with ``?run_id=``), oldest first; headers only."""
    blobs = services_of(request).blobs
    return {"object": "list", "data": await to_thread_to_completion(_list, blobs, run_id)}


@router.get("/v1/states/{state_id}", response_model=None)
async def download_state(request: Request, state_id: str) -> Response:
    """The blob's bytes, hash-verified, with its key and token count in headers.

    Sent from a verified map of the file, a piece at a time: a state of gigabytes is never
    copied into memory whole, and the map keeps the bytes it checked even if the blob is
    removed while it goes out."""
    services = services_of(request)
    blobs, chunks = services.blobs, services.chunks

    def read() -> tuple[memoryview, StateHeader]:
        view = blobs.map(state_id)
        if is_chunked_blob(view):  # its KV is in the chunk store: joined into a whole state
            if chunks is None:
                raise StateError("it is kept as KV chunks, and the chunk store is off")
            view = memoryview(whole_state(ChunkedState.from_bytes(view), chunks).to_bytes())
        return view, KVState.read_header(view)

    try:
        view, header = await to_thread_to_completion(read)
    except BlobMissing:
        raise StateNotFound(state_id) from None
    except (BlobCorrupt, StateError) as exc:
        raise StateCorrupt(str(exc)) from None
    key = json.dumps(header.key.model_dump(), separators=(",", ":"))
    return StreamingResponse(
        _pieces(view),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(len(view)),
            "X-PCRT-State-Key": key,
            "X-PCRT-State-Tokens": str(header.n_tokens),
        },
    )


def _pieces(view: memoryview, size: int = 1 << 20) -> Iterator[bytes]:
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


@router.put("/v1/states", response_model=None)
async def upload_state(request: Request, model: str | None = None) -> JSONResponse:
    """Store a blob after checking its hash and, with ``?model=``, its compatibility key."""
    services = services_of(request)
    limit = services.settings.state_upload_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadContentLength(f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise StateTooLarge(limit, size)
    # streamed to disk as it arrives: a state of gigabytes costs a chunk of memory
    with disk_errors(services.blobs), services.blobs.incoming() as blob:
        try:
            await receive_into(request, blob, limit)
        except BodyTooLarge:
            raise StateTooLarge(limit) from None
        if not blob.size:
            raise EmptyBody("the body is empty: send the state blob's bytes")

        def parse() -> StateHeader:
            view = blob.finish()
            KVState.from_bytes(view)  # verifies the header, the length and the payload hash
            return KVState.read_header(view)

        try:
            header = await to_thread_to_completion(parse)
        except StateError as exc:
            raise StateCorrupt(str(exc)) from None
        if model is not None:
            async with services.pool.lease(model) as loaded:
                name, engine_key = loaded.name, loaded.engine.compat_key
            problems = engine_key.mismatches(header.key)
            if problems:  # 409 incompatible_state
                raise IncompatibleState(
                    f"this KV state does not fit {name!r}: " + "; ".join(problems)
                )
        state_id = await to_thread_to_completion(blob.commit)
        size = blob.size
    log.info("stored KV state %s (%d bytes, %d tokens)", state_id, size, header.n_tokens)
    return JSONResponse(
        {
            "id": state_id,
            "object": "state",
            "size": size,
            "model": header.model,
            "tokens": header.n_tokens,
            "key": header.key.model_dump(),
        },
        status_code=201,
        headers={"Location": f"/v1/states/{state_id}"},
    )


@router.delete("/v1/states/{state_id}", response_model=None)
async def delete_state(request: Request, state_id: str) -> dict[str, Any]:
    """Remove a blob and its index row (a run that needed it recomputes instead)."""
    blobs = services_of(request).blobs

    def remove() -> bool:
        try:
            return blobs.remove(state_id)
        except BlobMissing:  # not even a well-formed id
            return False

    if not await to_thread_to_completion(remove):
        raise StateNotFound(state_id)
    return {"id": state_id, "object": "state", "deleted": True}
