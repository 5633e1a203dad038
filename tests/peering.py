"""What the tests of daemons working as peers share: waiting for the peer table to say
something, and names no other test's daemon has (mDNS on loopback is one network for
every test of the session)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

__all__ = ["unique_name", "wait_for"]


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Seconds until ``condition`` held; AssertionError naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"not within {timeout} s: {what}")


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
