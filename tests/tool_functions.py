"""Python callables the tool registry's tests name as entry points
(``tests.tool_functions:add``)."""

from __future__ import annotations

import asyncio
import time

__all__ = ["add", "boom", "greet", "not_json", "slow"]

NOT_CALLABLE = 42


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    The second paragraph is not part of the description."""
    return a + b


async def greet(name: str) -> dict[str, str]:
    """Greet someone, asynchronously."""
    await asyncio.sleep(0)
    return {"greeting": f"hello {name}"}


def slow(seconds: float) -> str:
    """Block a thread for a while."""
    time.sleep(seconds)
    return "done"


def boom(why: str) -> str:
    """Raise."""
    raise ValueError(f"boom: {why}")


def not_json() -> object:
    """Return something JSON cannot hold."""
    return {1, 2}
