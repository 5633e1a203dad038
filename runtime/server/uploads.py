"""Request bodies into the blob store: a KV state upload, from a user or a peer.

The body goes to disk as it arrives, in pieces of about 1 MiB written by a worker thread:
a state of gigabytes costs a few MiB of memory, and a slow disk stalls no token stream on
the event loop. A disk that refuses a write (full, read-only) is ``StorageFull`` (507),
with the partial file removed. A peer's upload declares its hash up front
(``streamed_body_sha256``): the signature covers the hash, not the bytes read whole.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from fastapi import Request

from pcrt.cache.blobs import BlobStore, IncomingBlob, is_blob_id
from pcrt.routing.migrate import BLOBS_PATH
from pcrt.runtime.errors import BodyTooLarge, StorageFull
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["disk_errors", "receive_into", "streamed_body_sha256"]

_PIECE = 1 << 20


@contextlib.contextmanager
def disk_errors(blobs: BlobStore) -> Iterator[None]:
    """OSError from the blob store's disk as a clear ``StorageFull``."""
    try:
        yield
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise StorageFull(f"cannot store the state under {blobs.root}: {why}") from None


async def receive_into(request: Request, blob: IncomingBlob, limit: int) -> None:
    """The request's body into ``blob``; ``BodyTooLarge`` past ``limit`` bytes."""
    pending = bytearray()
    async for chunk in request.stream():
        if blob.size + len(pending) + len(chunk) > limit:
            raise BodyTooLarge(limit)
        pending += chunk
        if len(pending) >= _PIECE:
            await to_thread_to_completion(blob.write, bytes(pending))
            pending.clear()
    if pending:
        await to_thread_to_completion(blob.write, bytes(pending))


def streamed_body_sha256(request: Request) -> str | None:
    """The sha256 a blob upload declares (``PUT /v1/pcrt/blobs?sha256=...``): its cluster
    signature covers that hash, so the body is streamed to disk rather than read into
    memory to be checked, and ``receive_blob`` holds it to the hash. None for any other
    request (and for a sender that declares none: it is read and checked whole)."""
    if request.method != "PUT" or request.url.path != BLOBS_PATH:
        return None
    declared = request.query_params.get("sha256")
    return declared if declared is not None and is_blob_id(declared) else None
