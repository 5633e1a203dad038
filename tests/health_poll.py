"""``HealthPoll``: asks a live daemon's ``/health`` over and over from a thread while a
test's request runs, and samples this process's RSS (the test daemon runs in-process), so
a test can tell whether that request stalled the event loop or swelled the memory."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import httpx

__all__ = ["HealthPoll", "rss_bytes"]


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HealthPoll:
    """``with HealthPoll(url) as poll: ...``; then ``poll.worst``, ``poll.p99`` (seconds
    per /health answer) and ``poll.rss_growth`` (the most RSS rose over its start)."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self._url = url + "/health"
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-poll", daemon=True)
        # its own thread: a stalled /health must not stall the sampling too
        self._sampler = threading.Thread(target=self._sample, name="rss-sample", daemon=True)
        self.latencies: list[float] = []
        self.failures = 0
        self._rss_start = 0
        self._rss_peak = 0

    def __enter__(self) -> HealthPoll:
        self._rss_start = self._rss_peak = rss_bytes()
        self._thread.start()
        self._sampler.start()
        time.sleep(0.1)  # a few answers before the request under test
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._sampler.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self._url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok
                time.sleep(self._interval)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._rss_peak = max(self._rss_peak, rss_bytes())

    @property
    def worst(self) -> float:
        return max(self.latencies)

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    @property
    def rss_growth(self) -> int:
        return self._rss_peak - self._rss_start

    def report(self) -> str:
        return (
            f"/health: {len(self.latencies)} answers, p99 {self.p99 * 1000:.1f} ms, "
            f"worst {self.worst * 1000:.1f} ms; RSS +{self.rss_growth / 2**20:.1f} MiB"
        )
