"""``OwnedStream``: a streamed response that always gives back what its stream holds.

Starlette starts a ``StreamingResponse``'s iterator only after it has sent the headers,
and stops waiting for it as soon as the client is gone. A client that leaves before the
first chunk leaves the iterator unstarted, and an async generator that never started
never runs its ``finally``: a stream that holds a lease (a model's slot and its engine
request, a peer's connection) would hold it for good. A stream stopped at a ``yield``
runs its ``finally`` only when the garbage collector gets to it.

``OwnedStream`` closes its iterator when the response ends, however it ends (a started
one cleans up now), then awaits ``release`` for what an unstarted one never took back.
``release`` must be idempotent: after a stream that ran, it finds nothing left to do.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["OwnedStream"]


class OwnedStream(StreamingResponse):
    def __init__(
        self,
        content: AsyncGenerator[Any, None],
        *,
        release: Callable[[], Awaitable[None]],
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._stream = content
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()

    async def close(self) -> None:
        """End the stream and give back what it holds; for a stream read by another
        response (a translation) rather than sent."""
        try:
            await self._stream.aclose()
        finally:  # a stream whose own cleanup failed still gives back what it holds
            await self._release()
