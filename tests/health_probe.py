"""What a request costs the daemon while it runs: ``/health`` latency and RSS growth.

``HealthProbe(url)`` polls ``/health`` and samples the RSS of this process (a
``LiveServer`` daemon runs in it, in a thread) until it exits. The probe runs in a
process of its own: a thread here would stop with the daemon whenever the daemon holds
the GIL (a 4 GB ``str.join`` is one C call), and see neither the stall nor the memory.

Run as ``python -m tests.health_probe URL PID`` by ``HealthProbe``: it probes until its
stdin closes, then prints what it saw as JSON.

``loop_gaps()`` is the same question asked of an event loop a test runs itself: the
gaps between a coroutine's 5 ms ticks while the body of the ``async with`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import httpx
import psutil

__all__ = ["HealthProbe", "loop_gaps"]

_ROOT = Path(__file__).resolve().parents[1]


class HealthProbe:
    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss_start = 0
        self.rss_peak = 0
        self._child: subprocess.Popen[str] | None = None

    def __enter__(self) -> HealthProbe:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "tests.health_probe", self.url, str(os.getpid())],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._child.stdout is not None
        self._child.stdout.readline()  # "ready": it has answers from before the request
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._child is not None
        time.sleep(0.1)
        out, _ = self._child.communicate(timeout=120)
        seen = json.loads(out)
        self.latencies = seen["latencies"]
        self.failures = seen["failures"]
        self.rss_start, self.rss_peak = seen["rss_start"], seen["rss_peak"]

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_start

    def report(self, what: str) -> str:
        return (
            f"{what}: /health {len(self.latencies)} answers, p99 {self.p99 * 1e3:.1f} ms, "
            f"worst {self.worst * 1e3:.1f} ms; RSS +{self.rss_growth / 2**20:.1f} MB"
        )


@contextlib.asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """The gaps between 5 ms ticks of a coroutine on the loop, while the body runs."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)  # it ticks from here, before the body's first step
    try:
        yield gaps
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


def main(url: str, pid: int) -> None:
    """Poll ``url``/health every 20 ms and sample ``pid``'s RSS every 5 ms until stdin
    closes; print the latencies, failures and RSS as JSON."""
    stop = threading.Event()
    process = psutil.Process(pid)
    latencies: list[float] = []
    failures: list[str] = []
    rss = [process.memory_info().rss] * 2  # start, peak

    def poll() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(url + "/health").status_code
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                else:
                    if status != 200:
                        failures.append(f"status {status}")
                latencies.append(time.perf_counter() - started)
                stop.wait(0.02)

    def sample() -> None:
        while not stop.is_set():
            rss[1] = max(rss[1], process.memory_info().rss)
            stop.wait(0.005)

    threads = [threading.Thread(target=poll), threading.Thread(target=sample)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes it
    stop.set()
    for thread in threads:
        thread.join()
    seen = {"latencies": latencies, "failures": failures, "rss_start": rss[0], "rss_peak": rss[1]}
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
