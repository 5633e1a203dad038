"""When a daemon on a draining battery moves its runs to peers: once per discharge.

``LowBattery`` is fed battery readings and says when to move: at the first reading on
battery (unplugged) below the threshold, and not again until the battery has been plugged
in or back at or above the threshold, so a run started afterwards, or one that could not
move, is not chased at every reading. No battery, or an unknown power state, changes
nothing. Pure: no clock, no I/O; ``runtime/api/battery_watch.py`` does the reading.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcrt.device.profile import Battery

__all__ = ["LowBattery"]


@dataclass
class LowBattery:
    threshold: float  # percent
    armed: bool = True  # false from a trigger until the battery recovers

    def update(self, battery: Battery | None) -> bool:
        """Whether this reading should move the runs now."""
        if battery is None:
            return False
        if battery.plugged_in is True or battery.percent >= self.threshold:
            self.armed = True
            return False
        if battery.plugged_in is False and self.armed:
            self.armed = False
            return True
        return False
