"""Waiting on a request's work while watching its client: the one loop that notices a
client that left a non-streamed request (a stream notices when its next send fails)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

__all__ = ["POLL_SECONDS", "left_before"]

POLL_SECONDS = 0.25  # how often the client is looked at while the work runs


async def left_before(work: asyncio.Future[Any], request: Request) -> bool:
    """Wait until ``work`` is done (False) or the client has disconnected (True); the
    work is left as it is either way, for the caller to take or to stop."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=POLL_SECONDS)
        if done:
            return False
        if await request.is_disconnected():
            return True
