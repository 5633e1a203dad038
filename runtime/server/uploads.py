"""Request bodies into the blob store: a KV state upload, from a user or a peer.

The body goes to disk as it arrives, in pieces of about 1 MiB written by a worker thread:
a state of gigabytes costs a few MiB of memory, and a slow disk stalls no token stream on
the event loop. A disk that refuses a write (full, read-only) is ``StorageFull`` (507),
with the partial file removed.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from fastapi import Request

from pcrt.cache.blobs import BlobStore, IncomingBlob
from pcrt.runtime.errors import BodyTooLarge, StorageFull
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["disk_errors", "receive_into"]

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
