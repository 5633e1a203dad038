"""What Ollama's routes share on the wire: model names, timestamps, NDJSON lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

__all__ = ["FOREVER", "iso", "line", "model_name", "now"]

FOREVER = "2318-01-01T00:00:00Z"  # what Ollama shows for a model kept loaded for good


def model_name(name: str) -> str:
    """The registry's name for an Ollama model name: ``name:latest`` is ``name``."""
    return name.removesuffix(":latest")


def iso(timestamp: float) -> str:
    """A wall-clock time as Ollama writes it (RFC 3339, UTC)."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # past the calendar: as good as never
        return FOREVER


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(data: dict[str, Any]) -> str:
    """One NDJSON line: a streamed piece of an answer, or a pull's progress."""
    return json.dumps(data, ensure_ascii=False) + "\n"
