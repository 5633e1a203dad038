"""``pcrt serve`` as a real process: CLI clients, graceful shutdown, a public bind refused
without a key. (Keep-alive and eviction: ``test_model_pool.py``.)"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from pcrt.cli.main import main
from pcrt.runtime.paths import Paths
from tests.live_server import free_port

MODEL = "smollm2-135m"


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"pcrt serve exited early: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("pcrt serve did not become healthy")


@pytest.fixture
def daemon(
    default_model_path: Path, pcrt_env: Paths, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with running_serve(monkeypatch, parallel=2, threads=2) as running:
        yield running


@contextlib.contextmanager
def running_serve(
    monkeypatch: pytest.MonkeyPatch, *, parallel: int, threads: int
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real ``pcrt serve`` on a free port, healthy, with ``PCRT_URL`` pointing the CLI
    at it; killed on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pcrt = Path(sys.executable).with_name("pcrt")
    proc = subprocess.Popen(
        [
            str(pcrt),
            "serve",
            "--port",
            str(port),
            "--parallel",
            str(parallel),
            "--ctx",
            "1024",
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(url, proc)
        monkeypatch.setenv("PCRT_URL", url)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_talks_to_the_daemon(daemon: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = daemon
    runner = CliRunner()
    ran = runner.invoke(main, ["run", "--json", "--temperature", "0", "--max-tokens", "8", "Hello"])
    assert ran.exit_code == 0, ran.output
    data = json.loads(ran.output)
    assert data["ran_on"] == "daemon" and data["usage"]["completion_tokens"] > 0
    ps = runner.invoke(main, ["ps"])
    assert ps.exit_code == 0 and MODEL in ps.output and "0/2" in ps.output
    usage = runner.invoke(main, ["usage", "--json"])
    rows = json.loads(usage.output)
    assert rows[0]["agent"] == "anonymous" and rows[0]["requests"] == 1
    assert rows[0]["completion_tokens"] == data["usage"]["completion_tokens"]
    table = runner.invoke(main, ["usage", "--since", "1h"], env={"COLUMNS": "200"})
    assert "anonymous" in table.output
    stop = runner.invoke(main, ["stop", MODEL])
    assert stop.exit_code == 0 and "unloaded" in stop.output
    assert httpx.get(url + "/v1/pcrt/ps").json()["models"] == []

    # the daemon's log says what it did; pcrt logs reads its end
    example = Path(__file__).parent.parent / "examples" / "dags" / "summary_titles.yaml"
    assert runner.invoke(main, ["dag", "run", str(example), "--json"]).exit_code == 0
    logged = runner.invoke(main, ["logs", "-n", "200"])
    assert logged.exit_code == 0, logged.output
    for said in (f"loaded {MODEL}", f"unloaded {MODEL}", "(/dynamic/summary_titles) started"):
        assert said in logged.output, said
    assert any(line.endswith(" succeeded") for line in logged.output.splitlines())
    assert len(runner.invoke(main, ["logs", "-n", "2"]).output.splitlines()) == 2


def test_ps_without_a_daemon_is_a_clear_error() -> None:
    result = CliRunner().invoke(main, ["ps"])
    assert result.exit_code == 1
    assert "no pcrt daemon answers" in result.output


def test_sigterm_lets_running_streams_finish(daemon: tuple[str, subprocess.Popen[str]]) -> None:
    url, proc = daemon
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a story."}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
    }
    lines: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert lines[-1] == "data: [DONE]"  # the running stream was not cut
    # uvicorn drains, then re-raises the signal so the exit status says "terminated"
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=1)


def test_serve_refuses_a_public_bind_without_a_key() -> None:
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "API key" in result.output


def test_a_second_daemon_on_the_same_home_or_port_is_one_clear_line(
    daemon: tuple[str, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A port in use, and a home another daemon holds: each refused before anything
    starts, in one line that says what to do (no start-up log, no Errno 98 traceback)."""
    url, running = daemon
    port = int(url.rsplit(":", 1)[1])
    pcrt = str(Path(sys.executable).with_name("pcrt"))

    def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [pcrt, "serve", "--log-level", "warning", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    elsewhere = {**os.environ, "PCRT_HOME": str(tmp_path / "another-home")}
    taken = serve(elsewhere, "--port", str(port))
    assert taken.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in taken.stderr and "pcrt ps" in taken.stderr
    assert "Traceback" not in taken.stderr and "startup complete" not in taken.stderr.lower()

    shared = serve(os.environ.copy(), "--port", str(free_port()))
    assert shared.returncode == 1
    assert f"another pcrt serve (pid {running.pid})" in shared.stderr
    assert "PCRT_HOME" in shared.stderr and "Traceback" not in shared.stderr
    assert running.poll() is None  # the first one serves on


def test_logs_without_a_daemon_log_is_a_clear_error() -> None:
    result = CliRunner().invoke(main, ["logs"])
    assert result.exit_code == 1 and "no daemon log at" in result.output


def test_logs_follow_prints_new_lines_and_survives_a_rotation(pcrt_env: Paths) -> None:
    log = pcrt_env.daemon_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("one\ntwo\n", encoding="utf-8")
    pcrt = str(Path(sys.executable).with_name("pcrt"))
    follower = subprocess.Popen(
        [pcrt, "logs", "-n", "1", "-f"],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert follower.stdout is not None
        assert _next_line(follower.stdout.fileno()) == "two\n"
        with log.open("a", encoding="utf-8") as more:
            more.write("three\n")
        assert _next_line(follower.stdout.fileno()) == "three\n"
        log.rename(log.with_suffix(".log.1"))  # what the rotating handler does
        log.write_text("four\n", encoding="utf-8")
        assert _next_line(follower.stdout.fileno()) == "four\n"
    finally:
        follower.kill()
        follower.wait()


def _next_line(fd: int, seconds: float = 15) -> str:
    """The next line a process writes, or a failure after ``seconds`` (never a hang)."""
    got = b""
    deadline = time.monotonic() + seconds
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line within {seconds} s (so far {got!r})"
        byte = os.read(fd, 1)
        assert byte, f"the output ended (so far {got!r})"
        got += byte
    return got.decode()


def test_dag_run_detach_and_ctrl_c_have_one_meaning_each(
    daemon: tuple[str, subprocess.Popen[str]],
) -> None:
    """--detach leaves the run to the daemon; Ctrl-C while following cancels it (its
    checkpoints kept), as it does a run in this process."""
    url, _ = daemon
    examples = Path(__file__).parent.parent / "examples" / "dags"
    runner = CliRunner()
    detached = runner.invoke(
        main, ["dag", "run", "--detach", str(examples / "summary_titles.yaml")]
    )
    assert detached.exit_code == 0, detached.output
    run_id = detached.stdout.strip()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/dags/{run_id}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the detached run did not finish"
        time.sleep(0.2)
    both = runner.invoke(
        main, ["dag", "run", "--detach", "--local", str(examples / "trip_plan.yaml")]
    )
    assert both.exit_code == 2 and "--detach" in both.output

    pcrt = str(Path(sys.executable).with_name("pcrt"))
    follower = subprocess.Popen(
        [pcrt, "dag", "run", "--follow", str(examples / "trip_plan.yaml"), "-i", "request=Rome"],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert follower.stdout is not None and follower.stderr is not None
    assert " started" in _next_line(follower.stdout.fileno(), 60)  # the run is under way
    follower.send_signal(signal.SIGINT)
    assert follower.wait(timeout=30) == 130
    said = follower.stderr.read().decode()
    assert "cancelled; its checkpoints are kept" in said, said
    cancelled = said.split("run ", 1)[1].split(" ", 1)[0]
    assert httpx.get(f"{url}/v1/dags/{cancelled}").json()["status"] == "cancelled"
