"""The stores as the event loop uses them: ``AsyncRunStore``, each method the same-named
``RunStore`` method awaited in a worker thread (and ``AsyncToolCalls``, ``AsyncResponses``
likewise for the tool calls' and the stored responses' stores).

Why two classes. A ``RunStore`` call blocks: a statement, the store's lock (a worker
thread writing a checkpoint's record holds it), a commit's fsync, a WAL checkpoint (tens
of ms), and for a run of 1,000 nodes, 1,000 rows of JSON decoded. On the event loop that
time is taken from every stream and from ``/health``. So the code on the loop (the DAG
executor, the daemon's routes and services) holds an ``AsyncRunStore`` and awaits it;
code that already runs in a worker thread, the CLI and tests use the ``RunStore`` itself
(``sync``). The method names are the same, so ``await runs.get_run(id)`` is
``runs.get_run(id)`` off the loop.

Each call runs in ``to_thread_to_completion``: a caller cancelled mid-statement (a run's
timeout, a shutdown) waits for its thread, so the store never closes under a statement,
and a write that began ends, as it would have on the loop. Calls that belong together
(a run and its nodes) are one ``RunStore`` method and so one hop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from pcrt.cache.responses import ResponseStore, StoredResponse
from pcrt.cache.runs import (
    NodeFinished,
    NodeRecord,
    NodeUpdate,
    RunCounters,
    RunRecord,
    RunStore,
)
from pcrt.cache.status import CallStatus, RunStatus
from pcrt.cache.tool_calls import CallRecord, NewCall, ToolCallStore
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["AsyncResponses", "AsyncRunStore", "AsyncToolCalls"]

T = TypeVar("T")


async def _in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return await to_thread_to_completion(functools.partial(fn, *args, **kwargs))


class AsyncRunStore:
    """``RunStore``, awaited: every call in a worker thread (see the module docstring)."""

    def __init__(self, runs: RunStore) -> None:
        self.sync = runs  # for code already in a worker thread

    # -- runs -------------------------------------------------------------------------

    async def create_run(
        self,
        run_id: str,
        dag_path: str,
        spec: dict[str, Any],
        inputs: dict[str, Any],
        nodes: Sequence[tuple[str, str, str]],
        *,
        parent: tuple[str, str] | None = None,
        agent: str | None = None,
    ) -> RunRecord:
        return await _in_thread(
            self.sync.create_run, run_id, dag_path, spec, inputs, nodes, parent=parent, agent=agent
        )

    async def import_run(
        self, run: dict[str, Any], nodes: list[dict[str, Any]], *, origin: str
    ) -> tuple[RunRecord, bool]:
        return await _in_thread(self.sync.import_run, run, nodes, origin=origin)

    async def get_run(self, run_id: str) -> RunRecord:
        return await _in_thread(self.sync.get_run, run_id)

    async def run_with_nodes(self, run_id: str) -> tuple[RunRecord, list[NodeRecord]]:
        return await _in_thread(self.sync.run_with_nodes, run_id)

    async def list_runs(
        self, status: str | None = None, limit: int = 100, *, children: bool = False
    ) -> list[RunRecord]:
        return await _in_thread(self.sync.list_runs, status, limit, children=children)

    async def set_status(
        self, run_id: str, status: RunStatus, *, error: str | None = None, **extra: Any
    ) -> None:
        await _in_thread(self.sync.set_status, run_id, status, error=error, **extra)

    async def mark_for_peer(self, run_id: str, peer: str) -> None:
        await _in_thread(self.sync.mark_for_peer, run_id, peer)

    async def mark_interrupted(self) -> list[str]:
        return await _in_thread(self.sync.mark_interrupted)

    # -- nodes ------------------------------------------------------------------------

    async def nodes(self, run_id: str) -> list[NodeRecord]:
        return await _in_thread(self.sync.nodes, run_id)

    async def node(self, run_id: str, node_id: str) -> NodeRecord:
        return await _in_thread(self.sync.node, run_id, node_id)

    async def update_node(self, run_id: str, node_id: str, update: NodeUpdate) -> None:
        await _in_thread(self.sync.update_node, run_id, node_id, update)

    async def finish_node(self, run_id: str, node_id: str, finished: NodeFinished) -> RunCounters:
        return await _in_thread(self.sync.finish_node, run_id, node_id, finished)

    async def counters(self, run_id: str) -> RunCounters:
        return await _in_thread(self.sync.counters, run_id)

    async def counters_and_unfinished(
        self, run_id: str, node_ids: Collection[str]
    ) -> tuple[RunCounters, int]:
        return await _in_thread(self.sync.counters_and_unfinished, run_id, node_ids)

    # -- subgraph cache -----------------------------------------------------------------

    async def cache_get(self, key: str) -> Any | None:
        return await _in_thread(self.sync.cache_get, key)

    async def cache_put(
        self, key: str, path: str, output: Any, tokens: int, max_entries: int
    ) -> None:
        await _in_thread(self.sync.cache_put, key, path, output, tokens, max_entries)


class AsyncToolCalls:
    """``ToolCallStore``, awaited: every call in a worker thread."""

    def __init__(self, calls: ToolCallStore) -> None:
        self.sync = calls

    async def find(self, run_id: str, node_id: str, step: int, seq: int) -> CallRecord | None:
        return await _in_thread(self.sync.find, run_id, node_id, step, seq)

    async def sent_step(
        self,
        run_id: str,
        node_id: str,
        step: int,
        calls: Sequence[NewCall],
        limit: int | None = None,
    ) -> list[CallRecord]:
        return await _in_thread(self.sync.sent_step, run_id, node_id, step, calls, limit)

    async def answered(
        self,
        run_id: str,
        node_id: str,
        step: int,
        seq: int,
        *,
        ok: bool,
        result: dict[str, Any],
        seconds: float | None,
        status: CallStatus = CallStatus.DONE,
    ) -> CallRecord:
        return await _in_thread(
            self.sync.answered,
            run_id,
            node_id,
            step,
            seq,
            ok=ok,
            result=result,
            seconds=seconds,
            status=status,
        )

    async def of_run(self, run_id: str) -> list[CallRecord]:
        return await _in_thread(self.sync.of_run, run_id)

    async def imported(self, run_id: str, calls: Sequence[dict[str, Any]]) -> None:
        await _in_thread(self.sync.imported, run_id, calls)


class AsyncResponses:
    """``ResponseStore``, awaited: every call in a worker thread (the Responses API's
    routes run on the loop)."""

    def __init__(self, responses: ResponseStore) -> None:
        self.sync = responses

    async def put(self, stored: StoredResponse) -> None:
        await _in_thread(self.sync.put, stored)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await _in_thread(self.sync.get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await _in_thread(self.sync.delete, response_id)
