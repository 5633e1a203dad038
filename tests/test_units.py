"""The one byte formatter: binary units everywhere pcrt prints a size."""

from __future__ import annotations

import pytest

from pcrt.device.units import GiB, KiB, MiB, TiB, format_bytes


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (KiB, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (98 * MiB + MiB // 5, "98.2 MiB"),
        (int(3.4 * GiB), "3.4 GiB"),
        (2 * TiB, "2.0 TiB"),
        (-930 * MiB, "-930.0 MiB"),
    ],
)
def test_sizes_read_in_binary_units(size: int, text: str) -> None:
    assert format_bytes(size) == text
