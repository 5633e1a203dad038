"""DAG runs in this process, on the local store under ``PCRT_HOME``: what ``pcrt dag``
does when no daemon answers (or with ``--local``), and what ``list`` and ``status`` read.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import click
from rich.console import Console

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunNotFound, RunRecord, RunStore
from pcrt.cache.status import NodeStatus, RunStatus
from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.cli.dag_view import FollowView
from pcrt.cli.progress import download_progress
from pcrt.runtime.dag import DagSpec, parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.library import library_from_documents
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.dag.spec import AgentNode, SubgraphNode
from pcrt.runtime.dag.subgraph import calls_tools, generating_nodes
from pcrt.runtime.dag.tasks import run_view
from pcrt.runtime.errors import PcrtError
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.threads import to_thread_to_completion
from pcrt.runtime.tools import ToolRegistry, ToolSettings

__all__ = ["Local", "execute_local", "get_run", "local", "local_runs"]


@dataclass
class Local:
    runner: DagRunner
    engines: LocalEngines
    tools: ToolSettings  # the config file's [tools]: started for each execution

    @property
    def runs(self) -> RunStore:
        return self.runner.runs


@contextlib.contextmanager
def local() -> Iterator[Local]:
    """The store under PCRT_HOME and a runner whose engines load on first use."""
    paths = Paths.from_env()
    registry = Registry.load(paths)
    tools = ServerSettings.load().tools  # what tool and agent nodes call, as the daemon's
    with Store(paths.db_path) as store:
        engines = LocalEngines(registry, parallel=4, progress=download_progress)
        # each generation's usage row, as the daemon writes them: pcrt usage counts the
        # runs made here too
        usage = UsageLog(store)
        runner = DagRunner(
            registry=registry,
            runs=RunStore(store),
            blobs=BlobStore(store, paths.home / "blobs"),
            lease=engines.lease,
            usage=usage.record_soon,
        )
        try:
            yield Local(runner, engines, tools)
        finally:
            engines.close()
            usage.close()


@contextlib.contextmanager
def local_runs() -> Iterator[RunStore]:
    """The run records alone: no registry, no runner."""
    with Store(Paths.from_env().db_path) as store:
        yield RunStore(store)


SHORTEST_PREFIX = 4  # as git: fewer characters name too many runs to be a habit


def full_run_id(runs: RunStore, given: str) -> str:
    """The run ``given`` names: its whole id, or the one run whose id starts with it (as
    git and Docker take prefixes). A prefix that names several is refused with them; one
    that names none is passed on as it is (a daemon with another home may know it)."""
    if len(given) < SHORTEST_PREFIX:
        return given
    found = runs.ids_starting_with(given, limit=6)
    if given in found or not found:
        return given
    if len(found) == 1:
        return found[0]
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    raise PcrtError(f"{given!r} starts several runs' ids ({shown}): give more of it")


def get_run(runs: RunStore, run_id: str) -> RunRecord:
    try:
        return runs.get_run(run_id)
    except RunNotFound:
        raise PcrtError(f"no DAG run {run_id!r} (see `pcrt dag list`)") from None


def execute_local(
    here: Local,
    run: str | Callable[[], RunRecord],
    follow: bool,
    console: Console,
) -> dict[str, Any]:
    """Run (or resume) in this process; Ctrl-C cancels the run and keeps its checkpoints.
    ``run``: the run's id, or how to create it (once its tools have started: a DAG is
    checked against the tools they list)."""
    runs = here.runs
    calls = True  # a new run's library is found when it is created: its tools may be there
    if isinstance(run, str):  # a recorded run carries every library DAG it reaches
        recorded = parse_dag(runs.get_run(run).spec)
        calls = calls_tools(recorded, library_from_documents(recorded.library))

    def lookup(run: str, node: str) -> dict[str, Any] | None:
        return asdict(runs.node(run, node))

    run_id = run if isinstance(run, str) else ""

    async def go() -> RunRecord:
        nonlocal run_id
        # the config's tools start (MCP servers too) only for a run that may call them
        needed = here.tools if calls else ToolSettings()
        async with ToolRegistry(needed) as tools:
            here.runner.use_tools(tools)
            if not isinstance(run, str):
                run_id = (await to_thread_to_completion(run)).id
            spec = parse_dag(runs.get_run(run_id).spec)
            done = {n.node_id for n in runs.nodes(run_id) if n.status == NodeStatus.SUCCEEDED}
            # load the models first: a first pull's progress bar must not fight the view
            for name in _models_needed(here.runner.registry, spec, done):
                async with here.engines.lease(name):
                    pass
            with FollowView(console, lookup, enabled=follow) as view:
                return await here.runner.execute(run_id, view.local_event)

    try:
        final = asyncio.run(go())
    except KeyboardInterrupt:
        if not run_id:
            sys.exit(130)
        if runs.get_run(run_id).status == RunStatus.PENDING:  # stopped while its models loaded
            runs.set_status(run_id, RunStatus.CANCELLED, error="cancelled; checkpoints kept")
        click.echo(
            f"run {run_id} cancelled; its checkpoints are kept (resume: pcrt dag resume {run_id})",
            err=True,
        )
        sys.exit(130)
    return run_view(here.runner.runs, final)


def _models_needed(registry: Registry, spec: DagSpec, done: set[str]) -> list[str]:
    carried = library_from_documents(spec.library)  # what subgraph nodes call
    names: list[str] = []
    for node_id, node in spec.nodes.items():
        if node_id in done:
            continue
        if isinstance(node, SubgraphNode) and node.dag in carried.dags:
            wanted = [n.model or n.tag for n in generating_nodes(carried.dags[node.dag], carried)]
        elif node.generates or isinstance(node, AgentNode):
            wanted = [node.model or node.tag]
        else:
            continue
        for name in (registry.resolve(w).name for w in wanted):
            if name not in names:
                names.append(name)
    return names
