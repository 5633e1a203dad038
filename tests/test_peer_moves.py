"""Moving DAG runs between pcrt daemons on loopback: ``pcrt dag migrate`` through the CLI
(with and without states), and ``migrate_on_drain`` on a real SIGTERM to ``pcrt serve``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.cli.main import main
from pcrt.runtime.paths import Paths
from tests.live_server import free_port
from tests.peering import unique_name, wait_for
from tests.test_daemon_cli import wait_healthy
from tests.test_peers import MOVE_DAG, _daemon, _in_rotation, _run_succeeds_on

# every daemon here, in this process or a `pcrt serve`, loads the default model
pytestmark = pytest.mark.usefixtures("default_model_path")


def _start_move_dag(server_url: str, dag: dict[str, Any] = MOVE_DAG) -> str:
    run = httpx.post(server_url + "/v1/dags", json={"dag": dag, "wait": False}, timeout=30)
    assert run.status_code == 202, run.text
    run_id: str = run.json()["id"]

    def story_checkpointed() -> bool:
        view = httpx.get(f"{server_url}/v1/dags/{run_id}", timeout=10).json()
        story = next(n for n in view["nodes"] if n["node_id"] == "story")
        assert view["status"] in ("pending", "running"), view  # the test acts before its end
        return bool(story["checkpoint_sha256"])

    wait_for(story_checkpointed, 60, "the story checkpointed", interval=0.02)
    return run_id


def test_dag_migrate_through_the_cli_with_and_without_states(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("here"), unique_name("there")
    env = {"COLUMNS": "250"}
    with _daemon(tmp_path, here_name, key) as here, _daemon(tmp_path, there_name, key) as there:
        wait_for(lambda: _in_rotation(here, there_name), 10, "here trusts there")
        env["PCRT_URL"] = here.url
        cli = CliRunner()

        # with states (the default): the summary a person reads
        run_id = _start_move_dag(here.url)
        moved = cli.invoke(main, ["dag", "migrate", run_id, "--to", there_name], env=env)
        assert moved.exit_code == 0, moved.output
        assert f"run {run_id} moved to {there_name}" in moved.output
        assert "states reused" in moved.output and "left behind" not in moved.output
        assert f"follow it there: {there.url}/v1/dags/{run_id}" in moved.output
        local = httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()
        assert local["status"] == "migrated"
        view = _run_succeeds_on(there, run_id)
        story = next(n for n in view["nodes"] if n["node_id"] == "story")
        assert story["resumed_from_checkpoint"]

        # --no-states: the record alone; the peer recomputes, and the answer says so
        run_id = _start_move_dag(here.url)
        args = ["dag", "migrate", run_id, "--to", there_name, "--no-states", "--json"]
        moved = cli.invoke(main, args, env=env)
        assert moved.exit_code == 0, moved.output
        result = json.loads(moved.output)
        assert result["peer"] == there_name and result["peer_url"] == there.url
        assert result["with_states"] is False and result["states_sent"] == 0
        assert result["states_left"] and all(
            "not sent (asked to move without states)" in reason for reason in result["states_left"]
        )
        assert result["note"] == "some nodes recompute on the peer"
        local = httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()
        assert local["status"] == "migrated"
        view = _run_succeeds_on(there, run_id)
        nodes = {n["node_id"]: n for n in view["nodes"]}
        assert nodes["intro"]["ran_on"] == here_name  # finished here: kept, not rerun
        assert not nodes["story"]["resumed_from_checkpoint"]  # recomputed there
        assert view["outputs"]["intro"] == local["outputs"]["intro"]

        # a peer nobody knows: a clear error, and the run stays here, resumable
        run_id = httpx.post(
            here.url + "/v1/dags", json={"dag": MOVE_DAG, "wait": False}, timeout=30
        ).json()["id"]
        refused = cli.invoke(main, ["dag", "migrate", run_id, "--to", "nobody"], env=env)
        assert refused.exit_code != 0 and "no pcrt peer 'nobody'" in refused.output
        status = httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()["status"]
        assert status in ("interrupted", "succeeded")


def _draining_serve(tmp_path: Path, key: str, name: str) -> tuple[str, subprocess.Popen[str]]:
    """``pcrt serve --lan`` with migrate_on_drain, the cluster key and loopback-only mDNS
    from a config file, as a user would start it."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[server]
parallel = 2
n_threads = 2

[peers]
interfaces = ["127.0.0.1"]
cluster_key = "{key}"
health_interval = 0.5
migrate_on_drain = true
""",
        encoding="utf-8",
    )
    port = free_port()
    pcrt = Path(sys.executable).with_name("pcrt")
    proc = subprocess.Popen(
        [
            str(pcrt),
            "serve",
            "--port",
            str(port),
            "--config",
            str(config),
            "--lan",
            "--name",
            name,
            "--log-level",
            "warning",
        ],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return f"http://127.0.0.1:{port}", proc


def test_sigterm_to_pcrt_serve_moves_its_running_run_to_a_peer(tmp_path: Path) -> None:
    """migrate_on_drain from a config file, on a real SIGTERM to ``pcrt serve --lan``."""
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("leaving"), unique_name("staying")
    dag = json.loads(json.dumps(MOVE_DAG))
    dag["nodes"]["story"]["max_tokens"] = 240  # still generating when the signal lands
    with _daemon(tmp_path, there_name, key) as there:
        url, proc = _draining_serve(tmp_path, key, here_name)
        try:
            wait_healthy(url, proc)
            wait_for(lambda: _in_rotation_at(url, there_name), 15, "here trusts there")
            run_id = _start_move_dag(url, dag)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Traceback" not in err, err
        with Store(Paths.from_env().db_path) as store:  # here's own store, after its exit
            record = RunStore(store).get_run(run_id)
        assert record.status == "migrated", (record.status, record.error)
        assert record.migrated_to is not None and record.migrated_to.startswith(there_name)

        view = _run_succeeds_on(there, run_id)
        nodes = {n["node_id"]: n for n in view["nodes"]}
        assert nodes["intro"]["ran_on"] == here_name
        assert nodes["story"]["resumed_from_checkpoint"]  # the drain sent its states


def _in_rotation_at(url: str, peer: str) -> bool:
    answer = httpx.get(url + "/v1/pcrt/peers", timeout=5).json()
    return any(p["name"] == peer and p["in_rotation"] for p in answer["peers"])


def test_sigterm_moves_a_run_whose_client_waits_on_it(tmp_path: Path) -> None:
    """The same drain while a client waits on the run (POST /v1/dags, wait is the default)
    and a node follows the one generating: the run moves, and the client is told so."""
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("leaving"), unique_name("staying")
    dag = json.loads(json.dumps(MOVE_DAG))
    dag["nodes"]["after"] = {
        "type": "llm",
        "context": "story",
        "prompt": "Say yes.",
        "temperature": 0,
        "max_tokens": 4,
        "cache": False,
    }
    answers: list[httpx.Response] = []
    with _daemon(tmp_path, there_name, key) as there:
        url, proc = _draining_serve(tmp_path, key, here_name)

        def wait_on_the_run() -> None:
            with contextlib.suppress(httpx.HTTPError):  # a daemon killed below: no answer
                answers.append(httpx.post(url + "/v1/dags", json={"dag": dag}, timeout=120))

        waiting = threading.Thread(target=wait_on_the_run, daemon=True)
        try:
            wait_healthy(url, proc)
            wait_for(lambda: _in_rotation_at(url, there_name), 15, "here trusts there")
            waiting.start()
            wait_for(
                lambda: bool(httpx.get(url + "/v1/dags", timeout=5).json()["data"]),
                30,
                "the run exists",
            )
            run_id = httpx.get(url + "/v1/dags", timeout=5).json()["data"][0]["id"]

            def story_checkpointed() -> bool:
                view = httpx.get(f"{url}/v1/dags/{run_id}", timeout=10).json()
                story = next(n for n in view["nodes"] if n["node_id"] == "story")
                return bool(story["checkpoint_sha256"])

            wait_for(story_checkpointed, 60, "the story checkpointed", interval=0.02)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
            waiting.join(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with Store(Paths.from_env().db_path) as store:
            record = RunStore(store).get_run(run_id)
        assert record.status == "migrated", (record.status, record.error)
        assert answers and answers[0].json()["status"] == "migrated"
        _run_succeeds_on(there, run_id)
