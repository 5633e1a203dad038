"""DAG runs through a running daemon, followed live: its SSE stream of a new run, or
polling a resumed run's view, both drive the same progress view as a local run."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console

from pcrt.cache.status import FINISHED_RUN_STATES, NodeStatus, RunStatus
from pcrt.cli.client import DaemonClient
from pcrt.cli.dag_view import FollowView
from pcrt.runtime.errors import PcrtError

__all__ = ["cancel_interrupted", "poll_daemon", "stream_daemon"]

_POLL_SECONDS = 0.5
# a node the daemon has started (or finished before a poll saw it start)
_STARTED = (NodeStatus.RUNNING, NodeStatus.SUCCEEDED, NodeStatus.FAILED)
_ENDED = (NodeStatus.SUCCEEDED, NodeStatus.FAILED)


def stream_daemon(
    client: DaemonClient, body: dict[str, Any], follow: bool, console: Console
) -> dict[str, Any]:
    """POST /v1/dags with stream=true; the events drive the progress view."""
    run_id: str | None = None

    def lookup(run: str, node: str) -> dict[str, Any] | None:
        return _node_from_view(client.get(f"/v1/dags/{run}"), node)

    try:
        with (
            FollowView(console, lookup, enabled=follow) as view,
            client.events("/v1/dags", {**body, "stream": True}) as stream,
        ):
            run_id = stream.headers.get("x-pcrt-run")
            for event in stream.events:
                data = json.loads(event.data or b"{}")
                run_id = run_id or data.get("run")
                view.event(event.event, str(data.get("run") or run_id), data.get("node"), data)
    except KeyboardInterrupt:
        if run_id:
            cancel_interrupted(client, run_id)
        sys.exit(130)
    if run_id is None:
        raise PcrtError("the daemon's stream ended without naming the run")
    result: dict[str, Any] = client.get(f"/v1/dags/{run_id}")
    return result


def cancel_interrupted(client: DaemonClient, run_id: str) -> None:
    """Ctrl-C while a daemon's run is followed: the run is cancelled, as one run here
    would be (one meaning wherever it runs; ``--detach`` leaves a run to the daemon)."""
    try:
        client.delete(f"/v1/dags/{run_id}")
    except PcrtError as exc:
        click.echo(f"could not cancel {run_id}: {exc} (pcrt dag cancel {run_id})", err=True)
        return
    click.echo(
        f"run {run_id} cancelled; its checkpoints are kept (resume: pcrt dag resume {run_id})",
        err=True,
    )


def poll_daemon(
    client: DaemonClient, run_id: str, before: dict[str, Any], console: Console
) -> dict[str, Any]:
    """Follow a resumed run by polling its view: node changes become progress lines."""
    finished = {n["node_id"] for n in before["nodes"] if n["status"] == NodeStatus.SUCCEEDED}
    checkpoints = {n["node_id"]: n["checkpoint_tokens"] for n in before["nodes"]}
    announced: set[str] = set()
    latest = before

    def lookup(_: str, node: str) -> dict[str, Any] | None:
        return _node_from_view(latest, node)

    try:
        with FollowView(console, lookup) as view:
            view.event("run_started", run_id, None, {"resumed": True})
            while True:
                latest = client.get(f"/v1/dags/{run_id}")
                for node in latest["nodes"]:
                    node_id, status = node["node_id"], node["status"]
                    if node_id in finished:
                        continue
                    if status in _STARTED and node_id not in announced:
                        announced.add(node_id)
                        view.event("node_started", run_id, node_id, node)
                    if node["checkpoint_tokens"] and node["checkpoint_tokens"] != checkpoints.get(
                        node_id
                    ):
                        checkpoints[node_id] = node["checkpoint_tokens"]
                        view.event(
                            "checkpoint", run_id, node_id, {"tokens": node["checkpoint_tokens"]}
                        )
                    if status in _ENDED:
                        finished.add(node_id)
                        view.event("node_finished", run_id, node_id, node)
                ended = latest["status"] in FINISHED_RUN_STATES
                if ended and latest["finished_at"] != before["finished_at"]:
                    return latest
                if (
                    latest["status"] == RunStatus.INTERRUPTED
                    and before["status"] != RunStatus.INTERRUPTED
                ):
                    return latest  # the daemon stopped under it
                time.sleep(_POLL_SECONDS)

    except KeyboardInterrupt:
        cancel_interrupted(client, run_id)
        sys.exit(130)


def _node_from_view(view: dict[str, Any], node_id: str) -> dict[str, Any] | None:
    return next((n for n in view.get("nodes", []) if n["node_id"] == node_id), None)
