"""SIGKILL while a DAG's tool call is in flight, in a real daemon: the call reached the
tool, the daemon died before its answer was recorded. A fresh daemon must not send a
non-idempotent call again (the run waits in ``needs_attention`` until a person says
--retry-call or --skip-call), and sends an idempotent one once more, and only once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcrt.runtime.paths import Paths
from tests.live_server import daemon_process, free_port
from tests.tool_http_server import ToolHttpServer

PAY = {
    "dag": "/dynamic/pay",
    "nodes": {
        "charge": {"type": "tool", "tool": "charge", "arguments": {"amount": 12}},
        "receipt": {
            "type": "tool",
            "tool": "receipt",
            "arguments": {"city": "Oslo"},
            "needs": ["charge"],
        },
    },
}


@pytest.fixture
def tool_server() -> Iterator[ToolHttpServer]:
    with ToolHttpServer() as server:
        yield server


def _config(path: Path, server: ToolHttpServer, idempotent: bool) -> Path:
    amount = '{ type = "object", properties = { amount = { type = "integer" } } }'
    path.write_text(
        f"""
[[tools.http]]
name = "charge"
url = "{server.url}/charge"
parameters = {amount}
idempotent = {str(idempotent).lower()}

[[tools.http]]
name = "receipt"
url = "{server.url}/weather"
idempotent = true
""",
        encoding="utf-8",
    )
    return path


def _daemon(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return daemon_process(port, env)


def _killed_mid_call(
    server: ToolHttpServer, env: dict[str, str], port: int
) -> tuple[str, dict[str, Any]]:
    """Start the run, wait until the charge reached the tool, SIGKILL the daemon."""
    url = f"http://127.0.0.1:{port}"
    daemon = _daemon(port, env)
    try:
        run_id = httpx.post(url + "/v1/dags", json={"dag": PAY, "wait": False}).json()["id"]
        deadline = time.monotonic() + 30
        while "/charge" not in server.paths():
            assert time.monotonic() < deadline, "the call never reached the tool"
            time.sleep(0.02)
        seen = httpx.get(url + f"/v1/dags/{run_id}").json()
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    server.release.set()  # the tool finishes its work; nobody hears the answer
    return run_id, seen


def test_a_non_idempotent_call_in_flight_waits_for_a_person(
    pcrt_env: Paths, tool_server: ToolHttpServer, tmp_path: Path
) -> None:
    env = {**os.environ, "PCRT_CONFIG": str(_config(tmp_path / "c.toml", tool_server, False))}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_id, seen = _killed_mid_call(tool_server, env, port)
    (in_flight,) = seen["tool_calls"]
    assert in_flight["status"] == "sent" and in_flight["arguments"] == {"amount": 12}

    daemon = _daemon(port, env)
    try:
        resumed = httpx.post(url + f"/v1/dags/{run_id}/resume?wait=true", timeout=60).json()
        assert resumed["status"] == "needs_attention", resumed
        assert "charge" in resumed["error"] and "--skip-call" in resumed["error"]
        assert tool_server.paths().count("/charge") == 1  # not sent again
        # `pcrt dag resume RUN --skip-call ...`: it was done; this is what it returned
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("pcrt")),
                "dag",
                "resume",
                run_id,
                "--skip-call",
                json.dumps({"charged": 12, "by": "hand"}),
                "--json",
            ],
            env={**env, "PCRT_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)
    finally:
        daemon.terminate()
        daemon.wait()
    assert view["status"] == "succeeded", view
    assert view["outputs"]["charge"] == {"charged": 12, "by": "hand"}
    assert tool_server.paths().count("/charge") == 1  # the charge was never repeated
    statuses = [c["status"] for c in view["tool_calls"]]
    assert statuses == ["skipped", "done"]


def test_an_idempotent_call_in_flight_is_sent_once_more(
    pcrt_env: Paths, tool_server: ToolHttpServer, tmp_path: Path
) -> None:
    env = {**os.environ, "PCRT_CONFIG": str(_config(tmp_path / "c.toml", tool_server, True))}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_id, _ = _killed_mid_call(tool_server, env, port)
    daemon = _daemon(port, env)
    try:
        resumed = httpx.post(url + f"/v1/dags/{run_id}/resume?wait=true", timeout=60).json()
        again = httpx.post(url + f"/v1/dags/{run_id}/resume?wait=true", timeout=60)
    finally:
        daemon.terminate()
        daemon.wait()
    assert resumed["status"] == "succeeded", resumed
    assert resumed["outputs"]["charge"] == {"charged": 12}
    assert tool_server.paths().count("/charge") == 2  # once more, and only once
    assert again.status_code == 400  # a finished run does not resume: nothing sent
    assert tool_server.paths().count("/charge") == 2
    (charge, _receipt) = resumed["tool_calls"]
    assert charge["attempts"] == 2 and charge["status"] == "done"
