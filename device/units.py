"""Bytes as people read them: the one formatter of the project, in binary units.

Memory, models, KV states and downloads are all sized in powers of two here (a GiB of
RAM, a MiB of KV per layer), so every size pcrt prints uses KiB, MiB, GiB and TiB.
"""

from __future__ import annotations

__all__ = ["GiB", "KiB", "MiB", "TiB", "format_bytes"]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


def format_bytes(n: int | float) -> str:
    """``512 B``, ``1.5 KiB``, ``98.2 MiB``, ``3.4 GiB``: one decimal past bytes."""
    size = abs(n)
    sign = "-" if n < 0 else ""
    if size < KiB:
        return f"{sign}{size:.0f} B"
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if size >= scale:
            return f"{sign}{size / scale:.1f} {unit}"
    return f"{sign}{size / KiB:.1f} KiB"
