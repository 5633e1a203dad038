"""``migrate_on_battery``: a daemon whose battery runs low moves its running DAG runs to
peers, once per discharge (``routing.battery.LowBattery`` decides when; ``moving.py``
moves them, as a drain does, and a run that cannot move goes on here)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pcrt.device.profile import Battery
from pcrt.routing.battery import LowBattery
from pcrt.runtime.server.moving import move_running_runs
from pcrt.runtime.server.services import Services

__all__ = ["BatteryReader", "RunMover", "watch_battery"]

log = logging.getLogger(__name__)

BatteryReader = Callable[[], Battery | None]
"""The battery now (None: none); the daemon reads its device monitor, tests inject one."""

RunMover = Callable[..., Awaitable[list[str]]]
"""What moves the running runs to peers: ``moving.move_running_runs``'s signature."""


async def watch_battery(
    services: Services,
    read: BatteryReader,
    interval: float,
    *,
    move: RunMover = move_running_runs,
) -> None:
    """Read the battery every ``interval`` seconds until cancelled; ``move`` moves the
    runs when it runs low (tests pass a fake)."""
    trigger = LowBattery(services.settings.peers.battery_threshold)
    while True:
        try:
            battery = read()
            if trigger.update(battery) and battery is not None:
                why = f"on battery at {battery.percent:g}%"
                log.warning(
                    "%s (below %g%%): moving running DAG runs to peers", why, trigger.threshold
                )
                moved = await move(services, why, resume_unmoved=True)
                log.warning(
                    "%s: moved %d run(s) to peers: %s", why, len(moved), ", ".join(moved) or "none"
                )
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed reading or move must not end the watch
            log.exception("the battery watch hit an error; it goes on")
        await asyncio.sleep(interval)
