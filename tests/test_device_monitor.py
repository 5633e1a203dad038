"""The daemon's live device profile: collected once, refreshed on a timer, stopped cleanly,
and served to peers while the daemon runs."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pcrt.device.monitor import DeviceMonitor
from pcrt.device.profile import read_build_info
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import ServerFactory
from tests.test_device_profile import FakeNvml, FakeNVMLError, GiB, two_gpus


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_monitor_refreshes_live_fields() -> None:
    nvml = two_gpus()
    monitor = DeviceMonitor(interval=0.05, nvml=nvml, build=read_build_info())
    with pytest.raises(RuntimeError, match="not started"):
        _ = monitor.latest
    first = await monitor.start()
    assert monitor.running and first.gpus[0].memory_free == 22 * GiB
    nvml.gpus[0].free = 5 * GiB  # the driver's figure changes...
    await wait_for(lambda: monitor.latest.gpus[0].memory_free == 5 * GiB)
    assert monitor.refreshes >= 1
    latest = monitor.latest
    assert latest.fingerprint == first.fingerprint  # ...the machine is the same
    assert latest.collected_at >= first.collected_at
    assert latest.cpu.percent is not None  # sampled between refreshes
    assert nvml.inits == 1  # NVML stays initialised between refreshes
    await monitor.stop()
    assert not monitor.running and nvml.shutdowns == 1
    count = monitor.refreshes
    await asyncio.sleep(0.15)
    assert monitor.refreshes == count  # stopped means stopped


async def test_monitor_without_nvml_and_as_context_manager() -> None:
    nvml = FakeNvml(init_error=FakeNVMLError(12, "NVML Shared Library Not Found"))
    async with DeviceMonitor(interval=0.05, nvml=nvml) as monitor:
        assert monitor.latest.cpu_only
        assert "NVML library not found" in (monitor.latest.cpu_only_reason or "")
        await monitor.refresh()
        assert monitor.latest.memory.total > 0
    assert not monitor.running and nvml.shutdowns == 0


def test_monitor_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        DeviceMonitor(interval=0)


def test_device_profile_for_peers(live_server: ServerFactory) -> None:
    server = live_server(ServerSettings())
    with httpx.Client(base_url=server.url, timeout=60) as h:
        profile = h.get("/v1/pcrt/device").json()
    assert profile["fingerprint"] and profile["cpu_only"] is True  # no GPU on this machine
    assert profile["cpu_only_reason"]
    assert server.services.monitor.running  # live fields keep refreshing while serving
