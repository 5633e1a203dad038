"""``pcrt dag``: run agent DAGs, list and inspect their runs, resume and cancel them.

``run --lib FILE_OR_DIR`` adds ``/lib`` DAGs for that run's subgraph nodes, over the
library directories (``$PCRT_HOME/lib`` and ``PCRT_LIB_PATH``); ``lib`` lists the library.

``run`` and ``resume`` go through the daemon when one answers (``PCRT_URL``) unless
``--local`` is given; otherwise the run executes in this process on the local store, so a
DAG works on a machine where no daemon was ever started. ``list`` and ``status`` read the
store directly: the daemon and the CLI share one SQLite file, so they work either way.

Inputs are ``-i key=value``: a value that parses as JSON is taken as JSON (``-i n=3``,
``-i tags='["a", "b"]'``), anything else as text; ``-i key=@FILE`` reads FILE. An input
the DAG declares as a string keeps the text exactly as typed (``-i year=1999`` stays
"1999"), since JSON-reading it could only turn it into a type the DAG refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import NodeInterrupted, RunNotFound, RunRecord, RunStore
from pcrt.cache.status import FINISHED_RUN_STATES, RESUMABLE_RUN_STATES, RunStatus
from pcrt.cache.store import Store
from pcrt.cli.client import DaemonClient
from pcrt.cli.progress import download_progress
from pcrt.device.units import format_bytes
from pcrt.runtime.dag import DagSpec, dependencies, load_dag, parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.library import (
    Library,
    library_from_documents,
    load_library,
    load_library_paths,
    run_library,
)
from pcrt.runtime.dag.runner import DagRunner, check_run
from pcrt.runtime.dag.spec import SubgraphNode
from pcrt.runtime.dag.subgraph import generating_nodes
from pcrt.runtime.dag.tasks import run_view
from pcrt.runtime.errors import DagInvalid, InvalidRequest, PcrtError, Problem, ShapeInvalid
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths

__all__ = ["dag", "parse_inputs"]

RUN_STATES = [status.value for status in RunStatus]  # values: click matches enums by name
_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "budget_exceeded": "red",
    "cancelled": "yellow",
    "interrupted": "magenta",
    "running": "cyan",
    "pending": "dim",
    "migrated": "blue",
}
_POLL_SECONDS = 0.5
_TAIL = 400  # characters of streamed text kept per stream for the live view

NodeLookup = Callable[[str, str], dict[str, Any] | None]
"""(run id, node id) -> the node's record as a dict (the ``nodes`` items of a run view)."""


# -- inputs and validation ---------------------------------------------------------------


def parse_inputs(pairs: Sequence[str], spec: DagSpec | None = None) -> dict[str, Any]:
    """``key=value`` pairs as a run's inputs (the rules are in the module docstring)."""
    declared = spec.input_specs if spec is not None else {}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="'-i'")
        if raw.startswith("@"):
            path = Path(raw[1:]).expanduser()
            try:
                raw = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise click.BadParameter(
                    f"{key}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                    param_hint="'-i'",
                ) from None
        decl = declared.get(key)
        if decl is not None and decl.type == "string":
            values[key] = raw
            continue
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values


def _check(spec: DagSpec, registry: Registry, inputs: dict[str, Any], extra: Library) -> None:
    """What the runner checks on create, before anything is sent or loaded."""
    if extra.problems:  # files named with --lib are checked even if nothing calls them
        raise DagInvalid(extra.problems)
    check_run(spec, registry, inputs, library=run_library(spec, Paths.from_env().lib_dirs, extra))


def _print_problems(exc: DagInvalid, source: str) -> None:
    count = len(exc.problems)
    noun = "problem" if count == 1 else "problems"
    click.secho(f"invalid DAG {source}: {count} {noun}", fg="red", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)


# -- the local store ---------------------------------------------------------------------


@dataclass
class _Local:
    runner: DagRunner
    engines: LocalEngines

    @property
    def runs(self) -> RunStore:
        return self.runner.runs


@contextlib.contextmanager
def _local() -> Iterator[_Local]:
    """The store under PCRT_HOME and a runner whose engines load on first use."""
    paths = Paths.from_env()
    registry = Registry.load(paths)
    with Store(paths.db_path) as store:
        engines = LocalEngines(registry, parallel=4, progress=download_progress)
        runner = DagRunner(
            registry=registry,
            runs=RunStore(store),
            blobs=BlobStore(store, paths.home / "blobs"),
            lease=engines.lease,
        )
        try:
            yield _Local(runner, engines)
        finally:
            engines.close()


@contextlib.contextmanager
def _runs() -> Iterator[RunStore]:
    with Store(Paths.from_env().db_path) as store:
        yield RunStore(store)


def _get_run(runs: RunStore, run_id: str) -> RunRecord:
    try:
        return runs.get_run(run_id)
    except RunNotFound:
        raise PcrtError(f"no DAG run {run_id!r} (see `pcrt dag list`)") from None


# -- the daemon --------------------------------------------------------------------------


def _answer(response: httpx.Response) -> Any:
    """The JSON of a daemon's answer; a 422 becomes DagInvalid, other errors one line."""
    try:
        data = response.json()
    except ValueError:
        raise PcrtError(f"the daemon answered {response.status_code} without JSON") from None
    if response.status_code >= 400:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        if error.get("problems"):
            raise DagInvalid([Problem(**p) for p in error["problems"]])
        raise PcrtError(f"daemon: {error.get('message') or response.status_code}")
    return data


def _request(client: DaemonClient, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return _answer(client.http.request(method, path, **kwargs))
    except httpx.ConnectError:
        raise PcrtError(f"no pcrt daemon answers at {client.url}") from None
    except httpx.HTTPError as exc:
        raise PcrtError(f"the daemon at {client.url} failed: {exc}") from None


def _sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a server-sent event stream; ``[DONE]`` ends it."""
    kind, data = "message", ""
    for line in lines:
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            if data == "[DONE]":
                return
            yield kind, json.loads(data)
            kind, data = "message", ""


def _node_from_view(view: dict[str, Any], node_id: str) -> dict[str, Any] | None:
    return next((n for n in view.get("nodes", []) if n["node_id"] == node_id), None)


# -- live progress -----------------------------------------------------------------------


class _Progress:
    """``--follow``: a line when a node starts and when it finishes (tokens, time, cache
    hit, checkpoint), and the text being generated: on a terminal a live view of every
    stream, elsewhere one stream at a time printed inline, so logs stay readable."""

    def __init__(self, console: Console, lookup: NodeLookup, enabled: bool = True) -> None:
        self.console = console
        self.lookup = lookup
        self.enabled = enabled
        self.live: Live | None = None
        self.started: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.tails: dict[tuple[str, int], str] = {}
        self.inline: tuple[str, int] | None = None
        self.refreshed = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled and self.console.is_terminal:
            self.live = Live(
                console=self.console,
                auto_refresh=False,
                transient=True,
                get_renderable=self._render,
            )
            self.live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end_inline()
        if self.live is not None:
            self.live.stop()
            self.live = None

    def local_event(self, event: DagEvent) -> None:
        self.event(event.kind, event.run_id, event.node, event.data)

    def event(self, kind: str, run_id: str, node: str | None, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if kind == "token" and node is not None:
            self._token(node, int(data.get("index") or 0), str(data.get("text") or ""))
        elif kind == "run_started":
            verb = "resumed" if data.get("resumed") else "started"
            self._line(Text.assemble(("run ", "bold"), (run_id, "bold"), f" {verb}"))
        elif kind == "node_started" and node is not None:
            self.started[node] = time.perf_counter()
            self.counts[node] = 0
            kind_text = f" ({data['type']})" if data.get("type") else ""
            self._line(Text.assemble(("→ ", "cyan"), (node, "bold"), kind_text))
        elif kind == "checkpoint" and node is not None:
            self._line(Text(f"  {node}: checkpoint at {data.get('tokens')} tokens", style="dim"))
        elif kind == "node_finished" and node is not None:
            self._finished(run_id, node, data)

    def _finished(self, run_id: str, node: str, data: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.started.pop(node, time.perf_counter())
        counted = self.counts.pop(node, 0)
        for key in [k for k in self.tails if k[0] == node]:
            del self.tails[key]
        if self.inline is not None and self.inline[0] == node:
            self._end_inline()
        if data.get("status") == "failed":
            self._line(
                Text.assemble(("✗ ", "red"), (node, "bold"), f" failed: {data.get('error')}")
            )
            return
        record = self.lookup(run_id, node) or {}
        tokens = record.get("completion_tokens")
        seconds = record.get("seconds")
        facts = [f"{elapsed if seconds is None else seconds:.2f} s"]
        if record.get("type") != "assert":
            facts.insert(0, f"{counted if tokens is None else tokens} tokens")
        if record.get("prompt_tokens"):
            facts.append(
                f"prompt {record['prompt_tokens']} ({record.get('cached_tokens') or 0} reused)"
            )
        if record.get("cache_hit"):
            facts.append("cache hit")
        if record.get("resumed_from_checkpoint"):
            facts.append("resumed from checkpoint")
        self._line(Text.assemble(("✓ ", "green"), (node, "bold"), ("  " + ", ".join(facts), "dim")))

    def _token(self, node: str, index: int, text: str) -> None:
        self.counts[node] = self.counts.get(node, 0) + 1
        key = (node, index)
        if self.live is not None:
            self.tails[key] = (self.tails.get(key, "") + text)[-_TAIL:]
            now = time.perf_counter()
            if now - self.refreshed > 0.08:
                self.refreshed = now
                self.live.refresh()
            return
        if self.inline is None:
            self.inline = key
            label = node if index == 0 else f"{node}[{index}]"
            self._write(f"  {label}> ")
        if self.inline == key:
            self._write(text.replace("\n", "\n    "))

    def _line(self, text: Text) -> None:
        self._end_inline()
        if self.live is not None:
            self.live.refresh()  # the live area printed below the line shows the news
        self.console.print(text, highlight=False)

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    def _end_inline(self) -> None:
        if self.inline is not None:
            self._write("\n")
            self.inline = None

    def _render(self) -> RenderableType:
        now = time.perf_counter()
        width = self.console.width
        lines: list[Text] = []
        for node, started in self.started.items():
            head = f" {self.counts.get(node, 0)} tok {now - started:.1f}s "
            streams = sorted(k for k in self.tails if k[0] == node)
            if not streams:
                lines.append(
                    Text.assemble(("… ", "yellow"), (node, "bold"), (head + "prefill", "dim"))
                )
            for key in streams:
                label = node if len(streams) == 1 else f"{node}[{key[1]}]"
                room = max(10, width - len(label) - len(head) - 3)
                tail = " ".join(self.tails[key].split())[-room:]
                lines.append(
                    Text.assemble(
                        ("… ", "yellow"),
                        (label, "bold"),
                        (head, "dim"),
                        tail,
                        no_wrap=True,
                        overflow="ellipsis",
                    )
                )
        return Group(*lines)


# -- results -----------------------------------------------------------------------------


def _format_output(output: Any) -> str:
    if isinstance(output, str):
        return output.strip()
    return json.dumps(output, indent=2, ensure_ascii=False)


def _print_outputs(view: dict[str, Any]) -> None:
    for node_id, output in view["outputs"].items():
        click.secho(f"── {node_id}", bold=True)
        click.echo(_format_output(output))


def _finish(view: dict[str, Any], as_json: bool) -> None:
    """The run's result on stdout; exit 1 with the error on stderr unless it succeeded."""
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False, default=str))
    else:
        done = _done(n["status"] for n in view["nodes"])
        click.echo(
            f"run {view['id']}: "
            + click.style(view["status"], fg=_STYLE.get(view["status"], "white"), bold=True)
            + f"  ({done}/{len(view['nodes'])} nodes done, {view['tokens_used']} tokens)"
        )
        _print_outputs(view)
    status = view["status"]
    if status != "succeeded":
        hint = f" (resume: pcrt dag resume {view['id']})" if status in RESUMABLE_RUN_STATES else ""
        error = view.get("error") or status
        what = error if error.startswith(status) else f"{status}: {error}"
        click.secho(f"error: run {view['id']} {what}{hint}", fg="red", err=True)
        sys.exit(1)


# -- executing ---------------------------------------------------------------------------


def _execute_local(local: _Local, run_id: str, follow: bool, console: Console) -> dict[str, Any]:
    """Run (or resume) in this process; Ctrl-C cancels the run and keeps its checkpoints."""
    runs = local.runs

    def lookup(run: str, node: str) -> dict[str, Any] | None:
        return asdict(runs.node(run, node))

    record = runs.get_run(run_id)
    spec = parse_dag(record.spec)
    done = {n.node_id for n in runs.nodes(run_id) if n.status == "succeeded"}

    async def go() -> RunRecord:
        # load the models first: a first pull's progress bar must not fight the live view
        for name in _models_needed(local.runner.registry, spec, done):
            async with local.engines.lease(name):
                pass
        with _Progress(console, lookup, enabled=follow) as progress:
            return await local.runner.execute(run_id, progress.local_event)

    try:
        final = asyncio.run(go())
    except KeyboardInterrupt:
        if runs.get_run(run_id).status == "pending":  # stopped while its models loaded
            runs.set_status(run_id, "cancelled", error="cancelled; checkpoints kept")
        click.echo(
            f"run {run_id} cancelled; its checkpoints are kept (resume: pcrt dag resume {run_id})",
            err=True,
        )
        sys.exit(130)
    return run_view(local.runner.runs, final)


def _models_needed(registry: Registry, spec: DagSpec, done: set[str]) -> list[str]:
    carried = library_from_documents(spec.library)  # what subgraph nodes call
    names: list[str] = []
    for node_id, node in spec.nodes.items():
        if node_id in done:
            continue
        if isinstance(node, SubgraphNode) and node.dag in carried.dags:
            wanted = [n.model or n.tag for n in generating_nodes(carried.dags[node.dag], carried)]
        elif node.generates:
            wanted = [node.model or node.tag]
        else:
            continue
        for name in (registry.resolve(w).name for w in wanted):
            if name not in names:
                names.append(name)
    return names


def _stream_daemon(
    client: DaemonClient, body: dict[str, Any], follow: bool, console: Console
) -> dict[str, Any]:
    """POST /v1/dags with stream=true; the events drive the progress view."""
    run_id: str | None = None

    def lookup(run: str, node: str) -> dict[str, Any] | None:
        return _node_from_view(_request(client, "GET", f"/v1/dags/{run}"), node)

    try:
        with (
            _Progress(console, lookup, enabled=follow) as progress,
            client.http.stream("POST", "/v1/dags", json={**body, "stream": True}) as response,
        ):
            if response.status_code >= 400:
                response.read()
                _answer(response)
            run_id = response.headers.get("x-pcrt-run")
            for kind, data in _sse(response.iter_lines()):
                run_id = run_id or data.get("run")
                progress.event(kind, str(data.get("run") or run_id), data.get("node"), data)
    except httpx.ConnectError:
        raise PcrtError(f"no pcrt daemon answers at {client.url}") from None
    except httpx.HTTPError as exc:
        raise PcrtError(f"the stream from {client.url} broke: {exc}") from None
    except KeyboardInterrupt:
        if run_id:
            click.echo(
                f"the daemon keeps running {run_id}: pcrt dag status {run_id}, "
                f"pcrt dag cancel {run_id}",
                err=True,
            )
        sys.exit(130)
    if run_id is None:
        raise PcrtError("the daemon's stream ended without naming the run")
    view: dict[str, Any] = _request(client, "GET", f"/v1/dags/{run_id}")
    return view


def _poll_daemon(
    client: DaemonClient, run_id: str, before: dict[str, Any], console: Console
) -> dict[str, Any]:
    """Follow a resumed run by polling its view: node changes become progress lines."""
    finished = {n["node_id"] for n in before["nodes"] if n["status"] == "succeeded"}
    checkpoints = {n["node_id"]: n["checkpoint_tokens"] for n in before["nodes"]}
    announced: set[str] = set()
    latest = before

    def lookup(_: str, node: str) -> dict[str, Any] | None:
        return _node_from_view(latest, node)

    with _Progress(console, lookup) as progress:
        progress.event("run_started", run_id, None, {"resumed": True})
        while True:
            latest = _request(client, "GET", f"/v1/dags/{run_id}")
            for node in latest["nodes"]:
                node_id, status = node["node_id"], node["status"]
                if node_id in finished:
                    continue
                if status in ("running", "succeeded", "failed") and node_id not in announced:
                    announced.add(node_id)
                    progress.event("node_started", run_id, node_id, node)
                if node["checkpoint_tokens"] and node["checkpoint_tokens"] != checkpoints.get(
                    node_id
                ):
                    checkpoints[node_id] = node["checkpoint_tokens"]
                    progress.event(
                        "checkpoint", run_id, node_id, {"tokens": node["checkpoint_tokens"]}
                    )
                if status in ("succeeded", "failed"):
                    finished.add(node_id)
                    progress.event("node_finished", run_id, node_id, node)
            ended = latest["status"] in FINISHED_RUN_STATES
            if ended and latest["finished_at"] != before["finished_at"]:
                return latest
            if latest["status"] == "interrupted" and before["status"] != "interrupted":
                return latest  # the daemon stopped under it
            time.sleep(_POLL_SECONDS)


# -- commands ----------------------------------------------------------------------------


@click.group()
def dag() -> None:
    """Agent DAGs: run one, list runs, inspect, resume, cancel; list the /lib library."""


@dag.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-i",
    "--input",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An input: JSON or text; KEY=@FILE reads a file. Repeatable.",
)
@click.option("-f", "--follow", is_flag=True, help="Show node progress and streamed tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (GET /v1/dags/RUN).")
@click.option("--local", is_flag=True, help="Run in this process even if a daemon is up.")
@click.option(
    "--lib",
    "libs",
    multiple=True,
    metavar="FILE_OR_DIR",
    type=click.Path(exists=True, path_type=Path),
    help="A /lib DAG, or a directory of them, for subgraph nodes (over the library dirs). "
    "Repeatable.",
)
def run_dag(
    file: Path,
    pairs: tuple[str, ...],
    follow: bool,
    as_json: bool,
    local: bool,
    libs: tuple[Path, ...],
) -> None:
    """Run the DAG in FILE (YAML, JSON or TOML) and print each node's output."""
    console = Console(stderr=as_json, highlight=False)
    try:
        try:
            spec = load_dag(file)
        except ShapeInvalid as exc:  # _check below refuses it with every problem at once
            spec = exc.partial
        inputs = parse_inputs(pairs, spec)
        registry = Registry.load()
        extra = load_library_paths(libs)
        _check(spec, registry, inputs, extra)
        view: dict[str, Any] | None = None
        if not local:
            with DaemonClient() as client:
                if client.is_up():
                    body = {
                        "dag": spec.document(),
                        "inputs": inputs,
                        "library": [callee.document() for callee in extra.dags.values()],
                    }
                    view = _stream_daemon(client, body, follow, console)
        if view is None:
            with _local() as here:
                record = here.runner.create(spec, inputs, extra)
                view = _execute_local(here, record.id, follow, console)
    except DagInvalid as exc:
        _print_problems(exc, str(file))
        sys.exit(1)
    _finish(view, as_json)


@dag.command("list")
@click.option("--status", type=click.Choice(RUN_STATES), default=None, help="Only these runs.")
@click.option("--json", "as_json", is_flag=True)
def list_runs(status: str | None, as_json: bool) -> None:
    """List DAG runs in the local store, newest first."""
    with _runs() as runs:
        records = runs.list_runs(status=status)
        done = {r.id: _done(n.status for n in runs.nodes(r.id)) for r in records}
    if as_json:
        data = [
            {
                "id": r.id,
                "dag": r.dag_path,
                "status": r.status,
                "error": r.error,
                "tokens_used": r.tokens_used,
                "nodes_executed": r.nodes_executed,
                "nodes": len(r.spec.get("nodes", {})),
                "nodes_done": done[r.id],
                "created_at": r.created_at,
                "finished_at": r.finished_at,
            }
            for r in records
        ]
        click.echo(json.dumps(data, indent=2))
        return
    if not records:
        click.echo("no DAG runs" + (f" with status {status}" if status else ""))
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "DAG", "STATUS", "NODES", "TOKENS", "CREATED", "FINISHED"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            r.id,
            r.dag_path,
            Text(r.status, style=_STYLE.get(r.status, "")),
            f"{done[r.id]}/{len(r.spec.get('nodes', {}))}",
            str(r.tokens_used),
            _when(r.created_at),
            _when(r.finished_at),
        )
    _stdout().print(table)


@dag.command("lib")
@click.option("--json", "as_json", is_flag=True)
def list_library(as_json: bool) -> None:
    """List the /lib subgraphs of the library directories, with their signatures."""
    dirs = Paths.from_env().lib_dirs
    library = load_library(dirs)
    entries = [_signature_view(path, library) for path in sorted(library.dags)]
    if as_json:
        problems = [str(p) for p in library.problems]
        click.echo(
            json.dumps(
                {"dirs": [str(d) for d in dirs], "dags": entries, "problems": problems}, indent=2
            )
        )
    elif not entries:
        click.echo(f"no /lib subgraphs in {', '.join(str(d) for d in dirs)}")
    else:
        table = Table(box=None, header_style="bold")
        for column in ("PATH", "INPUTS", "OUTPUTS", "FILE"):
            table.add_column(column, overflow="fold")
        for entry in entries:
            inputs = ", ".join(
                f"{name}: {decl['type']}"
                + ("" if decl["required"] else f" = {json.dumps(decl['default'])}")
                for name, decl in entry["inputs"].items()
            )
            outputs = ", ".join(
                name + (f": {decl['type']}" if decl["type"] else "")
                for name, decl in entry["outputs"].items()
            )
            table.add_row(entry["path"], inputs, outputs, entry["file"])
        _stdout().print(table)
    if library.problems:
        noun = "problem" if len(library.problems) == 1 else "problems"
        click.secho(f"the library has {len(library.problems)} {noun}", fg="red", err=True)
        for problem in library.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)


def _signature_view(path: str, library: Library) -> dict[str, Any]:
    spec = library.dags[path]
    inputs = spec.signature.inputs if spec.signature else {}
    outputs = spec.signature.outputs if spec.signature else {}
    return {
        "path": path,
        "description": spec.description,
        "file": library.sources[path],
        "inputs": {
            name: {"type": decl.type, "required": decl.required, "default": decl.default}
            for name, decl in inputs.items()
        },
        "outputs": {name: {"type": decl.type} for name, decl in outputs.items()},
    }


@dag.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (GET /v1/dags/RUN).")
def status(run_id: str, as_json: bool) -> None:
    """Show RUN as a tree of its nodes, then its outputs."""
    with _local() as here:
        record = _get_run(here.runs, run_id)
        view = run_view(here.runner.runs, record)
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False, default=str))
        return
    _stdout().print(_tree(view, record.spec))
    if view["outputs"]:
        click.echo()
        _print_outputs(view)


@dag.command()
@click.argument("run_id", metavar="RUN")
@click.option("-f", "--follow", is_flag=True, help="Show node progress while it runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (GET /v1/dags/RUN).")
@click.option("--local", is_flag=True, help="Resume in this process even if a daemon is up.")
def resume(run_id: str, follow: bool, as_json: bool, local: bool) -> None:
    """Resume RUN: finished nodes are kept, an interrupted node continues from its
    checkpoint."""
    console = Console(stderr=as_json, highlight=False)
    view: dict[str, Any] | None = None
    if not local:
        with DaemonClient() as client:
            if client.is_up():
                if follow:
                    before = _request(client, "GET", f"/v1/dags/{run_id}")
                    _request(client, "POST", f"/v1/dags/{run_id}/resume")
                    view = _poll_daemon(client, run_id, before, console)
                else:
                    view = _request(client, "POST", f"/v1/dags/{run_id}/resume?wait=true")
    if view is None:
        with _local() as here:
            record = _get_run(here.runs, run_id)
            if record.status not in RESUMABLE_RUN_STATES:
                raise InvalidRequest(
                    f"run {run_id} is {record.status}; "
                    f"only {', '.join(RESUMABLE_RUN_STATES)} runs resume"
                )
            view = _execute_local(here, run_id, follow, console)
    _finish(view, as_json)


@dag.command()
@click.argument("run_id", metavar="RUN")
def cancel(run_id: str) -> None:
    """Cancel RUN: it stops now, its outputs and checkpoints are kept (resume continues)."""
    with DaemonClient() as client:
        if client.is_up():
            view = _request(client, "DELETE", f"/v1/dags/{run_id}")
            if view["status"] == "cancelled":
                click.echo(f"run {run_id} cancelled; checkpoints kept")
            else:
                click.echo(f"run {run_id} is {view['status']}; nothing to cancel")
            return
        url = client.url
    with _runs() as runs:
        record = _get_run(runs, run_id)
        if record.finished:
            click.echo(f"run {run_id} is {record.status}; nothing to cancel")
            return
        if record.status == "running":
            click.echo(
                f"run {run_id} says running but no daemon answers at {url}: "
                "the daemon that ran it is gone, so it was interrupted"
            )
            for node in runs.nodes(run_id):
                if node.status == "running":
                    runs.update_node(run_id, node.node_id, NodeInterrupted())
        runs.set_status(run_id, "cancelled", error="cancelled; checkpoints kept")
    click.echo(f"run {run_id} cancelled; checkpoints kept (resume: pcrt dag resume {run_id})")


@dag.command()
@click.argument("run_id", metavar="RUN")
@click.option("--to", "peer", required=True, help="The pcrt peer's name (see pcrt peers).")
@click.option("--no-states", is_flag=True, help="Send the record alone; the peer recomputes.")
@click.option("--json", "as_json", is_flag=True)
def migrate(run_id: str, peer: str, no_states: bool, as_json: bool) -> None:
    """Move unfinished RUN, with its KV states, to PEER, which resumes it there."""
    with DaemonClient() as client:
        if not client.is_up():
            raise click.ClickException(f"no daemon answers at {client.url}: migration needs one")
        body = {"to": peer, "states": not no_states}
        result = _request(client, "POST", f"/v1/dags/{run_id}/migrate", json=body)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"run {run_id} moved to {result['peer']} in {result['seconds']:.2f} s: "
        f"{result['states_sent']} KV states ({format_bytes(result['bytes_sent'])}), "
        f"{result['note']}"
    )
    for reason in result["states_left"]:
        click.echo(f"  left behind: {reason}")
    click.echo(f"follow it there: {result['peer_url']}/v1/dags/{run_id}")


def _stdout() -> Console:
    """A console on stdout; a pipe or file gets long lines rather than a folded table."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _done(statuses: Iterable[str]) -> int:
    """Nodes with an output (``nodes_executed`` counts executions: resumes add to it)."""
    return sum(1 for status in statuses if status == "succeeded")


def _when(stamp: str | None) -> str:
    """A stored UTC timestamp in local time, to the second."""
    if not stamp:
        return "-"
    return datetime.datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _tree(view: dict[str, Any], document: dict[str, Any]) -> Tree:
    """The run and one branch per node: status, tokens, time, where, cache, checkpoint."""
    status = view["status"]
    root = Tree(
        Text.assemble(
            ("run ", "bold"),
            (view["id"], "bold"),
            f"  {view['dag']}  ",
            (status, f"bold {_STYLE.get(status, '')}"),
            (
                f"  {_done(n['status'] for n in view['nodes'])}/{len(view['nodes'])} nodes done, "
                f"{view['tokens_used']} tokens",
                "dim",
            ),
        )
    )
    if view.get("error"):
        root.add(Text(f"error: {view['error']}", style="red"))
    try:
        deps = dependencies(parse_dag(document))
    except DagInvalid:
        deps = {}
    for node in view["nodes"]:
        st = node["status"]
        branch = root.add(
            Text.assemble(
                (node["node_id"], "bold"), f"  {node['type']}  ", (st, _STYLE.get(st, ""))
            )
        )
        for fact in _node_facts(node, sorted(deps.get(node["node_id"], ()))):
            branch.add(fact)
    return root


def _node_facts(node: dict[str, Any], after: list[str]) -> list[Text]:
    facts: list[Text] = []
    if after:
        facts.append(Text(f"after: {', '.join(after)}", style="dim"))
    if node["prompt_tokens"] is not None or node["completion_tokens"] is not None:
        facts.append(
            Text(
                f"tokens: prompt {node['prompt_tokens'] or 0}, "
                f"cached {node['cached_tokens'] or 0}, "
                f"completion {node['completion_tokens'] or 0}"
            )
        )
    if node["seconds"] is not None:
        facts.append(Text(f"time: {node['seconds']:.2f} s"))
    if node["ran_on"]:
        model = f" ({node['model']})" if node["model"] else ""
        facts.append(Text(f"ran on: {node['ran_on']}{model}"))
    routing = node.get("routing") or {}
    for attempt in routing.get("attempts") or ():
        facts.append(Text(f"fell back from {attempt['node']}: {attempt['error']}", style="yellow"))
    if routing.get("reason"):
        facts.append(Text(f"routed: {routing['reason']}", style="dim"))
    if node.get("child_run_id"):
        facts.append(Text(f"subgraph run: {node['child_run_id']} (pcrt dag status it)"))
    if node["cache_hit"]:
        facts.append(Text("cache hit: no inference", style="green"))
    if node["resumed_from_checkpoint"]:
        facts.append(Text("resumed from its checkpoint", style="magenta"))
    if node["checkpoint_tokens"]:
        facts.append(Text(f"checkpoint: {node['checkpoint_tokens']} tokens"))
    if node["error"]:
        facts.append(Text(f"error: {node['error']}", style="red"))
    return facts
