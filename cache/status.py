"""The one vocabulary of DAG run and node statuses: what the store records, the executor
sets, the API answers and the CLI shows.

A run:

    pending ──> running ──> succeeded | failed | budget_exceeded
                  │  ╰────> cancelled (checkpoints kept: it resumes)
                  ╰───────> interrupted (the daemon stopped: it resumes)
    any unfinished ──> migrating ──> migrated (to a peer) | interrupted (the move failed)

A node: pending ──> running ──> succeeded | failed; running ──> interrupted when its run
stops (a resume continues it from its last checkpoint).

Both are ``StrEnum``: a member is equal to its text, so records, JSON and SQL carry plain
strings.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "FINISHED_RUN_STATES",
    "RESUMABLE_RUN_STATES",
    "UNFINISHED_RUN_STATES",
    "NodeStatus",
    "RunStatus",
]


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BUDGET_EXCEEDED = "budget_exceeded"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    MIGRATING = "migrating"
    MIGRATED = "migrated"


class NodeStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


# a run in one of these has ended here (``finished_at`` is set)
FINISHED_RUN_STATES = frozenset(
    {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.BUDGET_EXCEEDED,
        RunStatus.CANCELLED,
        RunStatus.MIGRATED,
    }
)
# a run in one of these executes again when resumed: a cancelled run keeps its checkpoints,
# so it resumes like an interrupted one
RESUMABLE_RUN_STATES = (
    RunStatus.PENDING,
    RunStatus.RUNNING,
    RunStatus.INTERRUPTED,
    RunStatus.CANCELLED,
)
# a run in one of these may still need its KV states: the blob store never evicts them
UNFINISHED_RUN_STATES = (*RESUMABLE_RUN_STATES, RunStatus.MIGRATING)
