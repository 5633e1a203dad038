"""The daemon's DAG runs in flight: one task per run, the listeners of its events, the
moves under way; and the view of a run that the API and the CLI show.

The daemon's code is on its event loop: ``DagTasks.runs`` is the run store it awaits
(``AsyncRunStore``); ``run_view`` reads the store in the caller's thread (the CLI's, or a
worker thread's)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from pcrt.cache.async_runs import AsyncRunStore
from pcrt.cache.runs import RunRecord, RunStore
from pcrt.cache.status import NodeStatus, RunStatus
from pcrt.cache.tool_calls import ToolCallStore
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["DagTasks", "decide_calls", "run_summary", "run_view"]


class DagTasks:
    """The daemon's running DAG executions, by run id (owned by the app's lifespan)."""

    def __init__(self, runner: DagRunner) -> None:
        self.runner = runner
        self.runs = AsyncRunStore(runner.runs)
        self.tasks: dict[str, asyncio.Task[RunRecord]] = {}
        # the running runs a peer sent and waits on (their records say so too, for a
        # restart: ``RunRecord.for_peer``); kept here, so no store read tells them apart
        self._for_peers: set[str] = set()
        self.listeners: dict[str, list[asyncio.Queue[DagEvent | None]]] = {}
        self._watching: set[asyncio.Queue[DagEvent | None]] = set()
        # runs being moved to a peer, set when the move ends (``moving.move_run``)
        self.moves: dict[str, asyncio.Event] = {}

    def start(self, run_id: str, *, for_peer: bool = False) -> asyncio.Task[RunRecord]:
        """Execute (or resume) the run in a task of its own; ``for_peer``: a run a peer
        sent and waits on (``RunRecord.for_peer``), which never moves from here."""
        if run_id in self.tasks:
            return self.tasks[run_id]
        if for_peer:
            self._for_peers.add(run_id)

        def emit(event: DagEvent) -> None:
            for queue in self.listeners.get(run_id, []):
                queue.put_nowait(event)

        async def execute() -> RunRecord:
            try:
                return await self.runner.execute(run_id, emit)
            finally:
                self.tasks.pop(run_id, None)
                self._for_peers.discard(run_id)
                for queue in self.listeners.pop(run_id, []):
                    queue.put_nowait(None)

        task = asyncio.create_task(execute(), name=f"dag-run-{run_id}")
        self.tasks[run_id] = task
        return task

    def listen(self, run_id: str, *, watching: bool = False) -> asyncio.Queue[DagEvent | None]:
        """A queue of the run's events, None after the last. ``watching``: a client that
        only watches (a dashboard tab), whose stream ends when the daemon drains
        (``end_watches``) rather than holding its shutdown."""
        queue: asyncio.Queue[DagEvent | None] = asyncio.Queue()
        self.listeners.setdefault(run_id, []).append(queue)
        if watching:
            self._watching.add(queue)
        return queue

    def end_watches(self) -> None:
        """The daemon drains: the watching clients' streams end now (their pages read the
        run again and wait for the daemon); the runs go on, or move."""
        for queues in self.listeners.values():
            for queue in queues:
                if queue in self._watching:
                    queue.put_nowait(None)

    def unlisten(self, run_id: str, queue: asyncio.Queue[DagEvent | None]) -> None:
        """Stop feeding a listener that left (a closed stream, a dashboard tab): its queue
        would otherwise fill with every token until the run ends."""
        self._watching.discard(queue)
        queues = self.listeners.get(run_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self.listeners.pop(run_id, None)

    def running(self, run_id: str) -> bool:
        """Whether the run executes here now (its events are still to come)."""
        return run_id in self.tasks

    @property
    def for_peers(self) -> set[str]:
        """The running runs a peer sent and waits on (``RunRecord.for_peer``): never
        moved from here."""
        return {run_id for run_id in self.tasks if run_id in self._for_peers}

    def movable(self) -> list[str]:
        """The running runs that are this daemon's own (a drain or low battery moves them)."""
        theirs = self.for_peers
        return [run_id for run_id in self.tasks if run_id not in theirs]

    async def outcome(self, run_id: str) -> RunRecord:
        """The run's record once it stops running here, however it stops: finished,
        failed, cancelled, or moved to a peer (a move under way is waited for, and a run
        that could not move and goes on here is waited for again). The waiter leaving
        does not stop the run."""
        while True:
            task, move = self.tasks.get(run_id), self.moves.get(run_id)
            if task is not None:
                await asyncio.wait({task})  # never raises the run's own cancellation
            elif move is not None:
                await move.wait()
            else:
                return await self.runs.get_run(run_id)

    async def cancel(self, run_id: str) -> bool:
        task = self.tasks.get(run_id)
        if task is None:
            return False
        task.cancel()
        # wait, not await: the run's cancellation is not ours, and ours (a shutdown
        # cancelling the battery watcher mid-move) must not be swallowed with it
        await asyncio.wait({task})
        return True

    async def decide(self, run_id: str, retry: bool, skip: tuple[Any] | None) -> None:
        """A person's word on a ``needs_attention`` run's calls in flight, before it
        resumes: send them again (``retry``), or take ``skip[0]`` as their result."""
        await to_thread_to_completion(decide_calls, self.runner.runs, run_id, retry, skip)

    async def close(self) -> None:
        """The daemon is stopping: its runs are interrupted, not cancelled by anyone, so
        that resume_on_start (or pcrt dag resume) picks them up from their checkpoints."""
        for run_id in list(self.tasks):
            await self.cancel(run_id)
            await self.runs.set_status(
                run_id, RunStatus.INTERRUPTED, error="the daemon stopped; resume continues it"
            )


def run_summary(run: RunRecord) -> dict[str, Any]:
    """The run in a listing: its record without inputs, outputs or nodes."""
    return {
        "id": run.id,
        "dag": run.dag_path,
        "status": run.status,
        "error": run.error,
        "tokens_used": run.tokens_used,
        "nodes_executed": run.nodes_executed,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
    }


def run_view(runs: RunStore, run: RunRecord) -> dict[str, Any]:
    """The run as the API answers it and the CLI shows it: its record, its finished
    nodes' outputs and every node's record. It reads the store: the daemon calls it in a
    worker thread (a run of 1,000 nodes is tens of ms of decoding and copying)."""
    nodes = runs.nodes(run.id)
    return {
        "id": run.id,
        "dag": run.dag_path,
        "status": run.status,
        "error": run.error,
        "inputs": run.inputs,
        "tokens_used": run.tokens_used,
        "nodes_executed": run.nodes_executed,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "migrated_to": run.migrated_to,
        "outputs": {n.node_id: n.output for n in nodes if n.status == NodeStatus.SUCCEEDED},
        "nodes": [asdict(n) for n in nodes],
        "tool_calls": [c.view() for c in ToolCallStore(runs.store).of_run(run.id)],
    }


def decide_calls(runs: RunStore, run_id: str, retry: bool, skip: tuple[Any] | None) -> None:
    """``DagTasks.decide`` in this thread (the CLI's resume without a daemon)."""
    if not retry and skip is None:
        return
    if retry and skip is not None:
        raise InvalidRequest("give --retry-call or --skip-call, not both")
    if runs.get_run(run_id).status != RunStatus.NEEDS_ATTENTION:
        raise InvalidRequest(f"run {run_id} has no tool call waiting for a decision")
    calls = ToolCallStore(runs.store)
    if retry:
        calls.decide(run_id, "retry")
    else:
        assert skip is not None
        calls.decide(run_id, "skip", skip[0])
