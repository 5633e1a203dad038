"""What the parts of a DAG run share: the runner's services (``RunnerDeps``), one run in
progress (``RunContext``), and the rules every part applies to it: the token budget a
finished node may break, and the usage row a finished generation bills.

The run's counters (tokens used, nodes executed) are the store's: ``RunStore.finish_node``
adds each node's in the transaction that finishes it and returns the new totals, and the
budget checks read them from there.

The executor runs on an event loop, so it awaits the store (``RunnerDeps.runs``, an
``AsyncRunStore``: each call in a worker thread); a node's records are written in the
order its code awaits them.

``Remote`` (the peers, as a run sees them) is here rather than in ``offsite.py``, which
uses it, because the services name it and every part imports the services.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import llama_cpp

from pcrt.cache.async_runs import AsyncRunStore, AsyncToolCalls
from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunCounters, RunRecord, RunStore
from pcrt.cache.usage import UsageRecord
from pcrt.routing.policy import Candidate, Decision, Work
from pcrt.runtime.dag.events import EventSink
from pcrt.runtime.dag.library import Library
from pcrt.runtime.dag.spec import DagSpec, SubgraphNode
from pcrt.runtime.dag.templates import DagSandbox
from pcrt.runtime.engine import EngineClient
from pcrt.runtime.errors import BudgetExceeded, PeerError
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.threads import to_thread_to_completion
from pcrt.runtime.tools import ToolRegistry

__all__ = [
    "DAG_ROUTE",
    "ENGINE_VERSION",
    "EngineLease",
    "Remote",
    "RunContext",
    "RunnerDeps",
    "new_run",
]

log = logging.getLogger(__name__)

DAG_ROUTE = "/v1/dags"  # the route usage rows of DAG generations are filed under
# in every cache key: another engine may generate otherwise
ENGINE_VERSION = f"pcrt-0.1/llama-cpp-python-{llama_cpp.__version__}"

EngineLease: TypeAlias = Callable[[str], AbstractAsyncContextManager[EngineClient]]
"""Given a model name, an async context manager holding its loaded engine."""


class Remote(Protocol):
    """Peers as the executor sees them (``pcrt.routing.remote.RemoteRunner``)."""

    @property
    def enabled(self) -> bool: ...

    def decide(self, work: Work) -> Decision: ...

    def known_names(self) -> tuple[set[str], set[str]]: ...

    def known_tools(self) -> set[str]:
        """The tools trusted peers run for a DAG's nodes (their idempotent ones)."""
        ...

    def failed(self, exc: PeerError) -> None: ...

    async def chat(
        self,
        candidate: Candidate,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        on_text: Callable[[int, str], None],
    ) -> Any: ...

    async def subgraph(
        self,
        candidate: Candidate,
        payload: dict[str, Any],
        timeout: float | None,
        agent: str | None = None,
    ) -> dict[str, Any]: ...


def new_run(
    runs: RunStore,
    spec: DagSpec,
    inputs: dict[str, Any],
    *,
    parent: tuple[str, str] | None = None,
    agent: str | None = None,
) -> RunRecord:
    """A new run of ``spec``, pending, with one pending record per node; ``parent``
    (run id, node id): a subgraph call's child run."""
    run_id = uuid.uuid4().hex[:12]
    nodes = [(node_id, node.path, node.type) for node_id, node in spec.nodes.items()]
    return runs.create_run(
        run_id, spec.dag, spec.document(), inputs, nodes, parent=parent, agent=agent
    )


@dataclass(frozen=True)
class RunnerDeps:
    """The runner's services, the same for every run it executes."""

    registry: Registry
    runs: AsyncRunStore  # awaited on the loop; ``runs.sync`` in worker threads
    blobs: BlobStore
    lease: EngineLease
    env: DagSandbox  # the Jinja2 sandbox templates render in
    ran_on: str  # this machine, as node records name it
    cache_entries: int  # the bound of the node and subgraph cache
    remote: Remote | None
    # the daemon's accounting: one row per generation, as for an HTTP request (None: the
    # CLI runs DAGs unaccounted, as it runs single prompts). It must not block: the
    # daemon's queues the row (``UsageLog.record_soon``)
    usage: Callable[[UsageRecord], None] | None
    calls: AsyncToolCalls  # the tool calls of tool and agent nodes, each recorded
    tools: ToolRegistry | None = None  # what tool and agent nodes call (None: no tools)

    @property
    def peers(self) -> Remote | None:
        """The peers, when nodes may be sent to them."""
        return self.remote if self.remote is not None and self.remote.enabled else None

    async def record_run(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        *,
        parent: tuple[str, str] | None = None,
        agent: str | None = None,
    ) -> RunRecord:
        """``new_run`` from the loop."""
        return await to_thread_to_completion(
            functools.partial(new_run, self.runs.sync, spec, inputs, parent=parent, agent=agent)
        )


@dataclass(frozen=True)
class RunContext:
    """One run being executed: what every part of it reads, and where its events go."""

    deps: RunnerDeps
    record: RunRecord
    spec: DagSpec
    outputs: dict[str, Any]  # the finished nodes' outputs, by id; grows as nodes finish
    emit: EventSink
    library: Library  # what the run's subgraph nodes call: the documents it was created with

    @property
    def id(self) -> str:
        return self.record.id

    async def counters(self) -> RunCounters:
        return await self.deps.runs.counters(self.record.id)

    async def tokens_left(self) -> int | None:
        """What the token budget still allows: None without a limit, zero or less once
        it is spent (a node finishing meanwhile may take the run past it)."""
        limit = self.spec.budget.max_tokens
        return None if limit is None else limit - (await self.counters()).tokens_used

    def stop_past_budget(self, totals: RunCounters, *, cut: bool = False) -> None:
        """A node that took the run past its token budget, or that the budget cut short
        (``cut``, even as the run's last node), stops the run; ``totals``, from its
        ``finish_node``, count its tokens."""
        limit = self.spec.budget.max_tokens
        if limit is not None and (cut or totals.tokens_used > limit):
            raise BudgetExceeded("max_tokens", f"{totals.tokens_used} of {limit} used")

    async def bill(self, node_id: str) -> None:
        """The usage row of a generation that just finished, from its node record: billed
        to the run's agent, ``ran_on`` the machine that did the work. A cache hit spent
        nothing and bills nothing; accounting never fails the run."""
        usage = self.deps.usage
        if usage is None:
            return
        try:
            rec = await self.deps.runs.node(self.id, node_id)
            if rec.cache_hit:
                return
            spec = self.spec.nodes[node_id]
            model = rec.model or (f"subgraph {spec.dag}" if isinstance(spec, SubgraphNode) else "")
            usage(
                UsageRecord(
                    agent=self.record.agent or "anonymous",
                    model=model,
                    route=DAG_ROUTE,
                    status=200,
                    prompt_tokens=rec.prompt_tokens or 0,
                    cached_tokens=rec.cached_tokens or 0,
                    completion_tokens=rec.completion_tokens or 0,
                    total_ms=(rec.seconds or 0.0) * 1000,
                    ran_on=rec.ran_on or self.deps.ran_on,
                    request_id=f"{self.id}/{node_id}",
                )
            )
        except Exception:
            log.exception("could not bill node %s of run %s", node_id, self.id)
