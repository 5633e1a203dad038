"""Worker threads that never outlive the coroutine that started them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["to_thread_to_completion"]

T = TypeVar("T")


async def to_thread_to_completion(fn: Callable[..., T], /, *args: Any) -> T:
    """``asyncio.to_thread``, except that a cancelled caller first waits for the thread.

    A thread cannot be stopped. With plain ``to_thread`` a cancelled caller (a run's
    timeout, a shutdown) returns at once while its thread goes on writing a blob or a
    record, and whoever closes the SQLite store next pulls the connection out from under
    that write: the process dies of a segmentation fault. Waiting here keeps the order
    "every write ends, then the store closes". The wait is short: these threads write or
    read one blob.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue  # cancelled again: the thread still has to end first
        if not task.cancelled():
            task.exception()  # retrieved: its error (if any) goes with the cancellation
        raise
