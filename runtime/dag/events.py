"""What a DAG run tells its listeners as it goes: ``DagEvent`` and its kinds.

The daemon streams them as server-sent events (``event: <kind>``), the CLI draws its live
view from them, and a subgraph call passes its child run's node events on to the caller's
listeners. A ``DagEventKind`` is a ``StrEnum``: equal to its text, the name on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

__all__ = ["DagEvent", "DagEventKind", "EventSink", "ignore"]


class DagEventKind(StrEnum):
    """The kinds of event, in the order a run gives them; ``data`` carries what each says."""

    RUN_STARTED = "run_started"  # data: resumed (whether some nodes had finished)
    NODE_STARTED = "node_started"  # data: the node's type
    TOKEN = "token"  # data: index (the sample), text
    CHECKPOINT = "checkpoint"  # data: tokens (generated so far)
    TOOL_CALLS = "tool_calls"  # data: step, calls ([{tool, ok, seconds}]): settled, recorded
    FALLBACK = "fallback"  # data: from (the peer that failed the node), error
    NODE_FINISHED = "node_finished"  # data: status, and output or error
    RUN_FINISHED = "run_finished"  # data: status, error, outputs


@dataclass(frozen=True)
class DagEvent:
    """One event of run ``run_id`` (a subgraph call's events carry its child run's id),
    about ``node`` unless it is about the run."""

    kind: DagEventKind
    run_id: str
    node: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


EventSink: TypeAlias = Callable[[DagEvent], None]
"""Where a run's events go (a listener; it must not block)."""


def ignore(_: DagEvent) -> None:
    """The listener of a run that no one watches."""
    return None
