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

import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pcrt.cache.status import RESUMABLE_RUN_STATES, NodeStatus, RunStatus
from pcrt.device.units import format_bytes
from pcrt.runtime.errors import DagInvalid, InvalidRequest, ShapeInvalid

if TYPE_CHECKING:
    from rich.console import Console

    from pcrt.runtime.dag import DagSpec
    from pcrt.runtime.dag.library import Library
    from pcrt.runtime.models.registry import Registry

__all__ = ["dag", "parse_inputs"]

RUN_STATES = [status.value for status in RunStatus]  # values: click matches enums by name


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
    from pcrt.runtime.dag.library import run_library
    from pcrt.runtime.dag.runner import check_run
    from pcrt.runtime.paths import Paths

    if extra.problems:  # files named with --lib are checked even if nothing calls them
        raise DagInvalid(extra.problems)
    check_run(spec, registry, inputs, library=run_library(spec, Paths.from_env().lib_dirs, extra))


def _print_problems(exc: DagInvalid, source: str) -> None:
    count = len(exc.problems)
    noun = "problem" if count == 1 else "problems"
    click.secho(f"invalid DAG {source}: {count} {noun}", fg="red", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)


# -- results ---------------------------------------------------------------------------


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
    from pcrt.cli.dag_tree import STATUS_STYLE, nodes_done

    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False, default=str))
    else:
        done = nodes_done(n["status"] for n in view["nodes"])
        click.echo(
            f"run {view['id']}: "
            + click.style(view["status"], fg=STATUS_STYLE.get(view["status"], "white"), bold=True)
            + f"  ({done}/{len(view['nodes'])} nodes done, {view['tokens_used']} tokens)"
        )
        _print_outputs(view)
    status = view["status"]
    if status != RunStatus.SUCCEEDED:
        hint = f" (resume: pcrt dag resume {view['id']})" if status in RESUMABLE_RUN_STATES else ""
        error = view.get("error") or status
        what = error if error.startswith(status) else f"{status}: {error}"
        click.secho(f"error: run {view['id']} {what}{hint}", fg="red", err=True)
        sys.exit(1)


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
    "--detach",
    is_flag=True,
    help="Leave the run to the daemon: print its id and return (pcrt dag status RUN).",
)
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
    detach: bool,
    libs: tuple[Path, ...],
) -> None:
    """Run the DAG in FILE (YAML, JSON or TOML) and print each node's output.

    Ctrl-C cancels the run, wherever it runs (here, or on the daemon); its checkpoints
    are kept, and pcrt dag resume RUN continues it. --detach leaves it to the daemon.
    """
    from rich.console import Console

    from pcrt.cli import dag_daemon, dag_local
    from pcrt.cli.client import DaemonClient
    from pcrt.runtime.dag import load_dag
    from pcrt.runtime.dag.library import load_library_paths
    from pcrt.runtime.models.registry import Registry

    if detach and local:
        raise click.UsageError("--detach leaves the run to a daemon; --local runs it here")
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
                    if detach:
                        started = client.post("/v1/dags", {**body, "wait": False})
                        run_id = started["id"]
                        click.echo(run_id)
                        click.echo(f"running on the daemon: pcrt dag status {run_id}", err=True)
                        return
                    view = dag_daemon.stream_daemon(client, body, follow, console)
                elif detach:
                    raise click.UsageError("--detach needs a running daemon (pcrt serve)")
        if view is None:
            with dag_local.local() as here:
                runner = here.runner
                view = dag_local.execute_local(
                    here, lambda: runner.create(spec, inputs, extra), follow, console
                )
    except DagInvalid as exc:
        _print_problems(exc, str(file))
        sys.exit(1)
    _finish(view, as_json)


@dag.command("list")
@click.option("--status", type=click.Choice(RUN_STATES), default=None, help="Only these runs.")
@click.option("--json", "as_json", is_flag=True)
def list_runs(status: str | None, as_json: bool) -> None:
    """List DAG runs in the local store, newest first."""
    from rich.table import Table
    from rich.text import Text

    from pcrt.cli.dag_local import local_runs
    from pcrt.cli.dag_tree import STATUS_STYLE, nodes_done
    from pcrt.runtime.dag.tasks import run_summary

    with local_runs() as runs:
        records = runs.list_runs(status=RunStatus(status) if status else None)
        done = {r.id: nodes_done(n.status for n in runs.nodes(r.id)) for r in records}
    if as_json:
        data = [
            {**run_summary(r), "nodes": len(r.spec.get("nodes", {})), "nodes_done": done[r.id]}
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
            Text(r.status, style=STATUS_STYLE.get(r.status, "")),
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
    from rich.table import Table

    from pcrt.runtime.dag.library import load_library
    from pcrt.runtime.paths import Paths

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


def _whole_id(given: str) -> str:
    """RUN as given, or the whole id of the one run it is a prefix of (this home's)."""
    from pcrt.cache.runs import RunStore
    from pcrt.cache.store import Store
    from pcrt.cli.dag_local import full_run_id
    from pcrt.runtime.paths import Paths

    with Store(Paths.from_env().db_path) as store:
        return full_run_id(RunStore(store), given)


@dag.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (GET /v1/dags/RUN).")
def status(run_id: str, as_json: bool) -> None:
    """Show RUN (its id, or the first characters of it) as a tree of its nodes, then
    its outputs."""
    from pcrt.cli.dag_local import get_run, local
    from pcrt.cli.dag_tree import run_tree
    from pcrt.runtime.dag.tasks import run_view

    with local() as here:
        record = get_run(here.runs, _whole_id(run_id))
        view = run_view(here.runner.runs, record)
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False, default=str))
        return
    _stdout().print(run_tree(view, record.spec))
    if view["outputs"]:
        click.echo()
        _print_outputs(view)


@dag.command()
@click.argument("run_id", metavar="RUN")
@click.option("-f", "--follow", is_flag=True, help="Show node progress while it runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (GET /v1/dags/RUN).")
@click.option("--local", is_flag=True, help="Resume in this process even if a daemon is up.")
@click.option(
    "--retry-call",
    is_flag=True,
    help="needs_attention: send the tool calls that were in flight again.",
)
@click.option(
    "--skip-call",
    metavar="RESULT_JSON",
    help="needs_attention: the calls in flight were done; this JSON is what they returned.",
)
def resume(
    run_id: str,
    follow: bool,
    as_json: bool,
    local: bool,
    retry_call: bool,
    skip_call: str | None,
) -> None:
    """Resume RUN: finished nodes are kept, an interrupted node continues from its
    checkpoint, and recorded tool calls are never sent again. A run that
    needs_attention waits for --retry-call or --skip-call."""
    from rich.console import Console

    from pcrt.cli import dag_daemon, dag_local
    from pcrt.cli.client import DaemonClient
    from pcrt.runtime.dag.tasks import decide_calls

    run_id = _whole_id(run_id)
    console = Console(stderr=as_json, highlight=False)
    view: dict[str, Any] | None = None
    skip: tuple[Any] | None = None
    if skip_call is not None:
        try:
            skip = (json.loads(skip_call),)
        except ValueError as exc:
            raise InvalidRequest(f"--skip-call takes JSON: {exc}") from None
    decision: dict[str, Any] | None = None
    if retry_call or skip is not None:
        decision = {"retry_call": retry_call, **({"skip_call": skip[0]} if skip else {})}
    if not local:
        with DaemonClient() as client:
            if client.is_up():
                if follow:
                    before = client.get(f"/v1/dags/{run_id}")
                    client.post(f"/v1/dags/{run_id}/resume", decision)
                    view = dag_daemon.poll_daemon(client, run_id, before, console)
                else:
                    view = client.post(f"/v1/dags/{run_id}/resume?wait=true", decision)
    if view is None:
        with dag_local.local() as here:
            record = dag_local.get_run(here.runs, run_id)
            if record.status not in RESUMABLE_RUN_STATES:
                states = ", ".join(RESUMABLE_RUN_STATES)
                raise InvalidRequest(f"run {run_id} is {record.status}; only {states} runs resume")
            decide_calls(here.runs, run_id, retry_call, skip)
            view = dag_local.execute_local(here, run_id, follow, console)
    _finish(view, as_json)


@dag.command()
@click.argument("run_id", metavar="RUN")
def cancel(run_id: str) -> None:
    """Cancel RUN: it stops now, its outputs and checkpoints are kept (resume continues)."""
    from pcrt.cache.runs import NodeInterrupted
    from pcrt.cli.client import DaemonClient
    from pcrt.cli.dag_local import get_run, local_runs

    run_id = _whole_id(run_id)

    with DaemonClient() as client:
        if client.is_up():
            view = client.delete(f"/v1/dags/{run_id}")
            if view["status"] == RunStatus.CANCELLED:
                click.echo(f"run {run_id} cancelled; checkpoints kept")
            else:
                click.echo(f"run {run_id} is {view['status']}; nothing to cancel")
            return
        url = client.url
    with local_runs() as runs:
        record = get_run(runs, run_id)
        if record.finished:
            click.echo(f"run {run_id} is {record.status}; nothing to cancel")
            return
        if record.status == RunStatus.RUNNING:
            click.echo(
                f"run {run_id} says running but no daemon answers at {url}: "
                "the daemon that ran it is gone, so it was interrupted"
            )
            for node in runs.nodes(run_id):
                if node.status == NodeStatus.RUNNING:
                    runs.update_node(run_id, node.node_id, NodeInterrupted())
        runs.set_status(run_id, RunStatus.CANCELLED, error="cancelled; checkpoints kept")
    click.echo(f"run {run_id} cancelled; checkpoints kept (resume: pcrt dag resume {run_id})")


@dag.command()
@click.argument("run_id", metavar="RUN")
@click.option("--to", "peer", required=True, help="The pcrt peer's name (see pcrt peers).")
@click.option("--no-states", is_flag=True, help="Send the record alone; the peer recomputes.")
@click.option("--json", "as_json", is_flag=True)
def migrate(run_id: str, peer: str, no_states: bool, as_json: bool) -> None:
    """Move unfinished RUN, with its KV states, to PEER, which resumes it there."""
    from pcrt.cli.client import DaemonClient

    run_id = _whole_id(run_id)
    with DaemonClient() as client:
        if not client.is_up():
            raise click.ClickException(f"no daemon answers at {client.url}: migration needs one")
        body = {"to": peer, "states": not no_states}
        result = client.post(f"/v1/dags/{run_id}/migrate", body)
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
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _when(stamp: str | None) -> str:
    """A stored UTC timestamp in local time, to the second."""
    if not stamp:
        return "-"
    return datetime.datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
