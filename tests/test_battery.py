"""A low battery moves the runs once per discharge (``routing/battery.py`` and the
daemon's ``battery_watch``)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any, cast

from pcrt.device.profile import Battery
from pcrt.routing.battery import LowBattery
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.server.battery_watch import watch_battery
from pcrt.runtime.server.services import Services
from pcrt.runtime.server.settings import ServerSettings


def _battery(percent: float, plugged_in: bool | None = False) -> Battery:
    return Battery(percent=percent, plugged_in=plugged_in, seconds_left=None)


def test_low_battery_triggers_once_per_discharge() -> None:
    trigger = LowBattery(threshold=30.0)
    readings = [
        (None, False),  # no battery at all
        (_battery(80), False),
        (_battery(29), True),  # crossed on battery: move
        (_battery(25), False),  # still low: once only
        (_battery(10), False),
        (_battery(10, plugged_in=None), False),  # power state unknown: nothing changes
        (_battery(12, plugged_in=True), False),  # plugged in: re-armed, not triggered
        (_battery(12), True),  # unplugged again below the threshold: move again
        (_battery(30), False),  # back at the threshold: re-armed
        (_battery(29.5), True),
        (_battery(5, plugged_in=None), False),
    ]
    assert [trigger.update(b) for b, _ in readings] == [want for _, want in readings]


def test_low_battery_never_triggers_when_plugged_in_or_unknown() -> None:
    trigger = LowBattery(threshold=30.0)
    assert not any(
        trigger.update(_battery(p, plugged)) for p in (50, 10, 1) for plugged in (True, None)
    )


async def test_battery_watch_moves_the_runs_once_and_outlives_a_bad_reading() -> None:
    readings: list[Battery | None | Exception] = [
        _battery(50),
        OSError("sensor gone"),
        _battery(20),
        _battery(19),
        _battery(18),
    ]
    moves: list[str] = []
    done = asyncio.Event()

    def read() -> Battery | None:
        reading = readings.pop(0) if readings else _battery(17)
        if not readings:
            done.set()
        if isinstance(reading, Exception):
            raise reading
        return reading

    async def move(services: Any, why: str, *, resume_unmoved: bool) -> list[str]:
        assert resume_unmoved  # the daemon keeps serving: an unmoved run goes on here
        moves.append(why)
        return ["r"]

    services = SimpleNamespace(settings=ServerSettings(peers=PeerSettings(battery_threshold=30)))
    task = asyncio.create_task(
        watch_battery(cast(Services, services), read, interval=0.001, move=move)
    )
    try:
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert moves == ["on battery at 20%"]
