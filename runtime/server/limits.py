"""Per-agent rate limits: token buckets for requests and tokens per minute.

A bucket holds up to one minute's allowance and refills continuously. A request takes
one request-token and is charged its prompt tokens up front (known before any work);
completion tokens are charged when it ends, so a burst of long answers slows the agent's
next requests rather than being cut off midway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pcrt.runtime.errors import RateLimited
from pcrt.runtime.server.settings import AgentLimits, LimitSettings

__all__ = ["RateLimiter", "TokenBucket"]


@dataclass
class TokenBucket:
    per_minute: float
    clock: Callable[[], float] = time.monotonic
    level: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.per_minute
        self.stamp = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_minute / 60)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` can be taken (0 when it can be taken now)."""
        self._refill()
        missing = min(amount, self.per_minute) - self.level
        return 0.0 if missing <= 0 else missing * 60 / self.per_minute

    def take(self, amount: float) -> None:
        """Take ``amount`` (the level may go negative: debt is paid by waiting)."""
        self._refill()
        self.level -= amount


class RateLimiter:
    """One pair of buckets per agent, made on first sight from the configured limits."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _buckets(self, agent: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        limits: AgentLimits = self.settings.for_agent(agent)
        req = tok = None
        if limits.requests_per_minute:
            req = self._requests.setdefault(
                agent, TokenBucket(limits.requests_per_minute, self.clock)
            )
        if limits.tokens_per_minute:
            tok = self._tokens.setdefault(agent, TokenBucket(limits.tokens_per_minute, self.clock))
        return req, tok

    def admit(self, agent: str, prompt_tokens: int) -> None:
        """Charge one request and its prompt tokens, or raise RateLimited (charging nothing)."""
        req, tok = self._buckets(agent)
        waits = []
        if req is not None and (w := req.wait_for(1)) > 0:
            waits.append((w, f"{req.per_minute:g} requests per minute"))
        if tok is not None and (w := tok.wait_for(max(prompt_tokens, 1))) > 0:
            waits.append((w, f"{tok.per_minute:g} tokens per minute"))
        if waits:
            wait, what = max(waits)
            raise RateLimited(
                f"agent {agent!r} is over its limit of {what}; retry in {math.ceil(wait)} s",
                retry_after=wait,
            )
        if req is not None:
            req.take(1)
        if tok is not None:
            tok.take(prompt_tokens)

    def charge(self, agent: str, tokens: int) -> None:
        """Charge tokens produced after admission (completion tokens)."""
        _, tok = self._buckets(agent)
        if tok is not None and tokens:
            tok.take(tokens)
