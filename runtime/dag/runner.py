"""Running a DAG: nodes in dependency order, independent ones at once, every step recorded.

A run is created (validated, inputs bound, one pending record per node) and then
executed; execution is also how it resumes: finished nodes keep their outputs, an
interrupted node continues from its last checkpoint. Nodes whose dependencies are done
start together, so the engine batches them, within the run's budget (``max_nodes``,
``max_tokens``, ``timeout_sec``).

This module schedules and dispatches; each kind of node runs elsewhere: a generation
where routing sends it (``offsite.py``; here, ``local.py``), a subgraph call as a child
run (``calls.py``), an assert and a fork of branches here. They share the run's context
and the runner's services (``context.py``) and tell listeners what happens
(``events.py``).

Execution runs on an event loop and awaits the run store in worker threads
(``AsyncRunStore``). Creating a run validates the DAG and reads the library directories:
``create`` does it in the caller's thread (the CLI, tests), ``create_in_thread`` in a
worker thread for the daemon's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pcrt.cache.async_runs import AsyncRunStore, AsyncToolCalls
from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import (
    NodeFailed,
    NodeFinished,
    NodeFinishedElsewhere,
    NodeInterrupted,
    RunCounters,
    RunRecord,
    RunStore,
)
from pcrt.cache.status import RESUMABLE_RUN_STATES, NodeStatus, RunStatus
from pcrt.cache.tool_calls import ToolCallStore
from pcrt.cache.usage import UsageRecord
from pcrt.runtime.dag.agent import run_agent
from pcrt.runtime.dag.calls import call_subgraph
from pcrt.runtime.dag.context import EngineLease, Remote, RunContext, RunnerDeps, new_run
from pcrt.runtime.dag.events import DagEvent, DagEventKind, EventSink, ignore
from pcrt.runtime.dag.library import (
    Library,
    calls_subgraphs,
    library_from_documents,
    run_library,
    with_library,
)
from pcrt.runtime.dag.load import parse_dag
from pcrt.runtime.dag.offsite import generate_routed, tools_needed, tools_on_peer
from pcrt.runtime.dag.spec import (
    AgentNode,
    AssertNode,
    Budget,
    DagSpec,
    ForkNode,
    SubgraphNode,
    ToolNode,
    tools_called,
)
from pcrt.runtime.dag.template_render import check_assert_async
from pcrt.runtime.dag.templates import make_environment, make_scope
from pcrt.runtime.dag.tools import run_tool_node
from pcrt.runtime.dag.validate import bind_inputs, dependencies, validate, validate_callees
from pcrt.runtime.errors import (
    AssertFailed,
    BudgetExceeded,
    DagInvalid,
    InvalidRequest,
    NeedsAttention,
    PcrtError,
)
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.threads import to_thread_to_completion
from pcrt.runtime.tools import ToolRegistry

__all__ = ["DagRunner", "check_run"]

log = logging.getLogger(__name__)

MAX_NODES_IN_FLIGHT = 32  # nodes of one run started and not finished


def check_run(
    spec: DagSpec,
    registry: Registry,
    inputs: dict[str, Any],
    remote: tuple[set[str], set[str]] | None = None,
    library: Library | None = None,
    tools: set[str] | None = None,
) -> dict[str, Any]:
    """Everything a run is checked for before it exists (DagInvalid lists every problem);
    returns the bound inputs. The CLI calls it too, before loading or sending anything.
    ``remote`` adds the model names and tags trusted peers offer. ``library`` is what
    subgraph nodes call (``run_library``; without it, the documents ``spec`` carries): the
    callees are validated too, and a library that failed to load is reported when the DAG
    calls subgraphs. ``tools``: the registered tools' names (None: not known here, as
    when the CLI checks a DAG it sends to a daemon, so not checked)."""
    names = set(registry.entries)
    aliases = {a for e in registry.entries.values() for a in e.aliases}
    tags = {t for e in registry.entries.values() for t in e.tags}
    if remote is not None:
        names |= remote[0]
        tags |= remote[1]
    if library is None:
        library = run_library(spec, dirs=())
    models = names | aliases
    problems = list(library.problems) if calls_subgraphs(spec) else []
    problems += validate(
        spec, known_models=models, known_tags=tags, library=library.dags, known_tools=tools
    )
    problems += validate_callees(
        library.closure(spec).values(),
        known_models=models,
        known_tags=tags,
        library=library.dags,
    )
    if problems:
        raise DagInvalid(problems, source=spec.dag)
    return bind_inputs(spec, inputs)


class DagRunner:
    """Creates runs and executes them (a resume is an execution), one task per node."""

    def __init__(
        self,
        *,
        registry: Registry,
        runs: RunStore,
        blobs: BlobStore,
        lease: EngineLease,
        ran_on: str = "local",
        cache_entries: int = 10_000,
        remote: Remote | None = None,
        library_dirs: Sequence[Path] | None = None,
        usage: Callable[[UsageRecord], None] | None = None,
        tools: ToolRegistry | None = None,
    ) -> None:
        self.deps = RunnerDeps(
            registry=registry,
            runs=AsyncRunStore(runs),
            blobs=blobs,
            lease=lease,
            env=make_environment(),
            ran_on=ran_on,
            cache_entries=cache_entries,
            remote=remote,
            usage=usage,
            calls=AsyncToolCalls(ToolCallStore(runs.store)),
            tools=tools,
        )
        # None: the directories of the environment (Paths.lib_dirs), read at each run's
        # creation, so library files added meanwhile count
        self.library_dirs = library_dirs

    @property
    def registry(self) -> Registry:
        return self.deps.registry

    def local_tools(self) -> set[str]:
        """The tools registered here, by name."""
        return {t.name for t in self.deps.tools.tools()} if self.deps.tools else set()

    def use_tools(self, tools: ToolRegistry | None) -> None:
        """The tools its runs call from now on: a registry entered on the loop that runs
        them (the CLI starts the config's tools for each local execution)."""
        self.deps = dataclasses.replace(self.deps, tools=tools)

    @property
    def runs(self) -> RunStore:
        """The run store itself, for the CLI, tests and worker threads: code on the event
        loop awaits ``deps.runs`` (the same methods, in worker threads)."""
        return self.deps.runs.sync

    @property
    def blobs(self) -> BlobStore:
        return self.deps.blobs

    @property
    def remote(self) -> Remote | None:
        return self.deps.remote

    @property
    def ran_on(self) -> str:
        return self.deps.ran_on

    @property
    def cache_entries(self) -> int:
        return self.deps.cache_entries

    # -- creating -----------------------------------------------------------------

    def create(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        library: Library | None = None,
        *,
        agent: str | None = None,
    ) -> RunRecord:
        """Validate (every problem at once: DagInvalid), bind inputs, record the run.
        ``library``: documents the request brought, over the library directories; the run
        records every library DAG it can reach, for its resume. ``agent``: whom its
        generations are billed to. In this thread: the event loop awaits
        ``create_in_thread``."""
        known = self.known_tools()
        return self._create(spec, inputs, library, agent, self._remote_names(), known)

    async def create_in_thread(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        library: Library | None = None,
        *,
        agent: str | None = None,
    ) -> RunRecord:
        """``create`` in a worker thread (validation, library files, the records), for
        the event loop."""
        # the peer table is the loop's: read here
        remote, known = self._remote_names(), self.known_tools()
        create = functools.partial(self._create, spec, inputs, library, agent, remote, known)
        return await to_thread_to_completion(create)

    async def create_partial(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        done: dict[str, Any],
        origin: str,
        *,
        agent: str | None = None,
    ) -> RunRecord:
        """A run of part of a DAG for the peer ``origin``, which waits on it
        (``RunRecord.for_peer``): ``done`` nodes are recorded as finished (where
        ``origin`` ran them) and only the rest execute here. In a worker thread."""
        unknown = set(done) - set(spec.nodes)
        if unknown:
            raise InvalidRequest(f"outputs given for unknown nodes: {sorted(unknown)}")
        remote = self._remote_names()
        # the done nodes ran on ``origin``: their tools need not be registered here
        done_tools = {name for node_id in done for name in tools_called(spec.nodes[node_id])}
        known = self.known_tools() | done_tools

        def create() -> RunRecord:
            record = self._create(spec, inputs, None, agent, remote, known)
            for node_id, output in done.items():
                given = NodeFinishedElsewhere(output=output, ran_on=origin)
                self.runs.update_node(record.id, node_id, given)
            self.runs.mark_for_peer(record.id, origin)
            return self.runs.get_run(record.id)

        return await to_thread_to_completion(create)

    def _remote_names(self) -> tuple[set[str], set[str]] | None:
        peers = self.deps.peers
        return peers.known_names() if peers is not None else None

    def known_tools(self) -> set[str]:
        """The tools a DAG here may call: this node's, and those trusted peers run."""
        peers = self.deps.peers
        return self.local_tools() | (peers.known_tools() if peers is not None else set())

    def _create(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        library: Library | None,
        agent: str | None,
        remote: tuple[set[str], set[str]] | None,
        tools: set[str],
    ) -> RunRecord:
        dirs = self.library_dirs if self.library_dirs is not None else Paths.from_env().lib_dirs
        resolved = run_library(spec, dirs, library)
        bound = check_run(spec, self.deps.registry, inputs, remote, resolved, tools)
        carried = with_library(spec, resolved.closure(spec))
        return new_run(self.runs, carried, bound, agent=agent)

    # -- executing ----------------------------------------------------------------

    async def execute(self, run_id: str, on_event: EventSink | None = None) -> RunRecord:
        """Run (or resume) until every node is done, a node fails, or a budget is hit."""
        runs = self.deps.runs
        record, nodes = await runs.run_with_nodes(run_id)
        if record.status not in RESUMABLE_RUN_STATES:
            return record
        # a 1,000-node document and its library: milliseconds of pydantic, off the loop
        spec, library = await to_thread_to_completion(_documents_of, record)
        done = {n.node_id: n.output for n in nodes if n.status == NodeStatus.SUCCEEDED}
        run = RunContext(self.deps, record, spec, done, on_event or ignore, library)
        await runs.set_status(run_id, RunStatus.RUNNING)
        log.info("run %s (%s) %s", run_id, record.dag_path, "resumed" if done else "started")
        run.emit(DagEvent(DagEventKind.RUN_STARTED, run_id, data={"resumed": bool(done)}))
        timeout = spec.budget.timeout_sec
        status, error = RunStatus.SUCCEEDED, None
        try:
            async with asyncio.timeout(timeout):
                await self._schedule(run)
        except TimeoutError:
            status = RunStatus.BUDGET_EXCEEDED
            error = f"budget exceeded: timeout_sec ({timeout} s)"
        except BudgetExceeded as exc:
            status, error = RunStatus.BUDGET_EXCEEDED, str(exc)
        except NeedsAttention as exc:
            status, error = RunStatus.NEEDS_ATTENTION, str(exc)
        except asyncio.CancelledError:
            # written even if cancelled again meanwhile (the thread ends first)
            await runs.set_status(run_id, RunStatus.CANCELLED, error="cancelled; checkpoints kept")
            log.info("run %s cancelled; checkpoints kept", run_id)
            data: dict[str, Any] = {"status": RunStatus.CANCELLED}
            run.emit(DagEvent(DagEventKind.RUN_FINISHED, run_id, data=data))
            raise
        except (PcrtError, AssertFailed) as exc:
            status, error = RunStatus.FAILED, str(exc)
        except Exception as exc:  # a bug must not leave the run "running" forever
            log.exception("run %s failed unexpectedly", run_id)
            status, error = RunStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}"
        await runs.set_status(run_id, status, error=error)
        log.info("run %s %s%s", run_id, status, f": {error}" if error else "")
        final = await runs.get_run(run_id)
        data = {"status": status, "error": error, "outputs": run.outputs}
        run.emit(DagEvent(DagEventKind.RUN_FINISHED, run_id, data=data))
        return final

    async def _schedule(self, run: RunContext) -> None:
        # every template parsed and compiled: ~10 ms for a long one, and a DAG has 1,000
        deps = await to_thread_to_completion(dependencies, run.spec)
        pending = [n for n in run.spec.nodes if n not in run.outputs]
        running: dict[asyncio.Task[dict[str, Any]], str] = {}
        try:
            while pending or running:
                # a bounded number at a time: a thousand ready asserts started at once
                # would queue a thousand steps ahead of every other request on the loop
                room = MAX_NODES_IN_FLIGHT - len(running)
                ready = [n for n in pending if deps[n] <= run.outputs.keys()][:room]
                spent, starting = await _spent(run, ready, list(running.values()))
                for node_id in ready:
                    pending.remove(node_id)
                    if spent is not None:
                        _check_budget(run.spec.budget, spent, starting)
                    task = asyncio.create_task(self._node(run, node_id), name=f"dag-{node_id}")
                    starting += 1
                    running[task] = node_id
                if not running:
                    stuck = ", ".join(pending)
                    raise PcrtError(f"nodes {stuck} wait for nodes that failed or never ran")
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    running.pop(task)
                    # a failure propagates from here; a subgraph sent whole to a peer
                    # answers for several nodes at once
                    for node_id, output in task.result().items():
                        run.outputs[node_id] = output
                        if node_id in pending:
                            pending.remove(node_id)
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(BaseException):
                    await task

    async def _node(self, run: RunContext, node_id: str) -> dict[str, Any]:
        """Run one node: its output, by its id, with those of the nodes that ran with it
        on a peer. Generations and calls write their own records (tokens, states,
        cache); an assert or a fork of branches is recorded here."""
        node = run.spec.nodes[node_id]
        runs = self.deps.runs
        run.emit(DagEvent(DagEventKind.NODE_STARTED, run.id, node_id, {"type": node.type}))
        started = time.perf_counter()
        scope = make_scope(run.record.inputs, run.outputs)
        produced: dict[str, Any]
        recorded = False  # its record written where it ran (a peer's answer)
        try:
            if isinstance(node, AssertNode):
                env = self.deps.env
                await check_assert_async(env, node.that, scope, node=node_id, message=node.message)
                produced = {node_id: True}
            elif isinstance(node, SubgraphNode):
                produced = {node_id: await call_subgraph(run, node, scope, self.execute)}
            elif isinstance(node, ToolNode | AgentNode) and not (
                tools_needed(run, node) <= self.local_tools()
            ):
                produced = await tools_on_peer(run, node)  # its tools are a peer's
                recorded = True  # as the peer's records said
            elif isinstance(node, ToolNode):
                produced = {node_id: await run_tool_node(run, node, scope)}
            elif isinstance(node, AgentNode):
                produced = {node_id: await run_agent(run, node, scope)}
            elif node.generates:
                produced = await generate_routed(run, node, scope)
            elif isinstance(node, ForkNode) and node.branches is not None:
                produced = {node_id: [run.outputs[b] for b in node.branches]}
            else:
                raise InvalidRequest(f"node {node_id}: type {node.type!r} cannot run")
        except NeedsAttention as exc:  # not failed: it goes on once a person decides
            await runs.update_node(run.id, node_id, NodeInterrupted())
            stopped = {"status": NodeStatus.INTERRUPTED, "error": str(exc)}
            run.emit(DagEvent(DagEventKind.NODE_FINISHED, run.id, node_id, stopped))
            raise
        except (PcrtError, AssertFailed) as exc:
            if isinstance(exc, BudgetExceeded) and await _succeeded(runs, run.id, node_id):
                # it finished, and spent the last of the budget: its output is kept
                data: dict[str, Any] = {"status": NodeStatus.SUCCEEDED}
                run.emit(DagEvent(DagEventKind.NODE_FINISHED, run.id, node_id, data))
                raise
            await runs.update_node(run.id, node_id, NodeFailed(str(exc)))
            data = {"status": NodeStatus.FAILED, "error": str(exc)}
            run.emit(DagEvent(DagEventKind.NODE_FINISHED, run.id, node_id, data))
            raise
        output = produced[node_id]
        if not (recorded or node.generates or isinstance(node, SubgraphNode | AgentNode)):
            finished = NodeFinished(
                output=output,
                ran_on=self.deps.ran_on,
                spent_tokens=0,
                seconds=time.perf_counter() - started,
            )
            await runs.finish_node(run.id, node_id, finished)
        data = {"status": NodeStatus.SUCCEEDED, "output": output}
        run.emit(DagEvent(DagEventKind.NODE_FINISHED, run.id, node_id, data))
        return produced


async def _spent(
    run: RunContext, ready: list[str], running: list[str]
) -> tuple[RunCounters | None, int]:
    """What the run has spent, and how many of the ``running`` nodes that does not count
    yet, for the budget checks of the ``ready`` nodes; (None, 0) when there is nothing to
    check (no node to start, or no node or token limit)."""
    budget = run.spec.budget
    if not ready or (budget.max_nodes is None and budget.max_tokens is None):
        return None, 0
    return await run.deps.runs.counters_and_unfinished(run.id, running)


def _check_budget(budget: Budget, spent: RunCounters, starting: int) -> None:
    """One more node may start, or the budget stops the run: ``starting``, the nodes
    running and those started before it, are not in the counters yet."""
    if budget.max_nodes is not None and spent.nodes_executed + starting >= budget.max_nodes:
        raise BudgetExceeded("max_nodes", f"{budget.max_nodes} nodes executed")
    if budget.max_tokens is not None and spent.tokens_used >= budget.max_tokens:
        raise BudgetExceeded("max_tokens", f"{spent.tokens_used} of {budget.max_tokens} used")


async def _succeeded(runs: AsyncRunStore, run_id: str, node_id: str) -> bool:
    return (await runs.node(run_id, node_id)).status == NodeStatus.SUCCEEDED


def _documents_of(record: RunRecord) -> tuple[DagSpec, Library]:
    """A run's recorded DAG and the library it carries."""
    spec = parse_dag(record.spec)
    return spec, library_from_documents(spec.library, origin=f"{spec.dag} library")
