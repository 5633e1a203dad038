"""The one vocabulary of DAG run and node statuses: what the store records, the executor
sets, the API answers and the CLI shows.

A run:

    pending ──> running ──> succeeded | failed | budget_exceeded
                  │  ╰────> cancelled (checkpoints kept: it resumes)
                  ├───────> interrupted (the daemon stopped: it resumes)
                  ╰───────> needs_attention (a tool call that must not be sent twice was
                            in flight when the daemon stopped: a person decides, then it
                            resumes with that call retried or its result given)
    any unfinished ──> migrating ──> migrated (to a peer) | interrupted (the move failed)

A node: pending ──> running ──> succeeded | failed; running ──> interrupted when its run
stops (a resume continues it from its last checkpoint).

A tool call (of a ``tool`` or ``agent`` node) is recorded before it is sent and its
result before anyone reads it: sent ──> done; or denied (refused, never sent); or a
call in flight when the daemon died ──> sent again (idempotent tools, or ``retry``) |
skipped (a person gave its result).

Both are ``StrEnum``: a member is equal to its text, so records, JSON and SQL carry plain
strings.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "FINISHED_RUN_STATES",
    "CallStatus",
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
    NEEDS_ATTENTION = "needs_attention"


class NodeStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class CallStatus(StrEnum):
    SENT = "sent"  # recorded, then sent: no result yet (in flight, or lost in a crash)
    DONE = "done"  # its result is recorded
    DENIED = "denied"  # the agent may not call it: refused before sending
    SKIPPED = "skipped"  # in flight when the daemon died; a person gave its result


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
    RunStatus.NEEDS_ATTENTION,
)
# a run in one of these may still need its KV states: the blob store never evicts them
UNFINISHED_RUN_STATES = (*RESUMABLE_RUN_STATES, RunStatus.MIGRATING)
