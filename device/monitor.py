"""A live device profile for the daemon: collected once, live fields refreshed on a timer.

The daemon's lifespan builds a ``DeviceMonitor``, ``await``s ``start()``, serves
``monitor.latest`` (``GET /v1/pcrt/device``, peers, the planner when a model loads) and
``await``s ``stop()`` on shutdown. Reads of psutil and NVML run in a worker thread, so the
event loop never waits on a slow driver; NVML stays initialised between refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pcrt.device.profile import (
    IMPORT_PYNVML,
    BuildInfo,
    DeviceProfile,
    NvmlProbe,
    collect_profile,
    load_pynvml,
    refresh_profile,
)

__all__ = ["DeviceMonitor"]

log = logging.getLogger(__name__)


class DeviceMonitor:
    """Keeps ``latest`` fresh: free memory, battery, temperatures, load, GPU readings."""

    def __init__(
        self,
        *,
        interval: float = 5.0,
        nvml: Any = IMPORT_PYNVML,
        build: BuildInfo | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the refresh interval must be positive")
        self.interval = interval
        self._nvml = nvml
        self._build = build
        self._probe: NvmlProbe | None = None
        self._latest: DeviceProfile | None = None
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0
        """How many refreshes ran since ``start`` (tests and metrics read it)."""

    @property
    def latest(self) -> DeviceProfile:
        if self._latest is None:
            raise RuntimeError("the device monitor is not started")
        return self._latest

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> DeviceProfile:
        """Collect the full profile (in a thread) and start the refresh loop."""
        if self.running:
            return self.latest
        self._latest = await asyncio.to_thread(self._collect)
        self._task = asyncio.create_task(self._loop(), name="pcrt-device-monitor")
        return self._latest

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._probe is not None:
            probe, self._probe = self._probe, None
            await asyncio.to_thread(probe.close)

    async def refresh(self) -> DeviceProfile:
        """Re-read the live fields now (also what the loop does every ``interval``)."""
        current = self.latest
        self._latest = await asyncio.to_thread(refresh_profile, current, probe=self._probe)
        self.refreshes += 1
        return self._latest

    async def __aenter__(self) -> DeviceMonitor:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def _collect(self) -> DeviceProfile:
        module = load_pynvml() if self._nvml is IMPORT_PYNVML else self._nvml
        probe = NvmlProbe(module)
        if probe.open():
            self._probe = probe  # keep NVML open: refreshes only query
        profile = collect_profile(nvml=None, build=self._build)
        gpu = (self._probe or probe).read()
        return profile.model_copy(update={"gpu": gpu})

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # a bad reading must not stop the monitor
                log.exception("device profile refresh failed")
