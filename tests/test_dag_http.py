"""DAG runs through the daemon: HTTP surface, and a SIGKILL in the middle of a long node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory, daemon_process, free_port

ESSAY = {
    "dag": "/dynamic/essay",
    "nodes": {
        "intro": {
            "type": "llm",
            "tag": "simple",
            "prompt": "Name a sea creature.",
            "temperature": 0,
            "max_tokens": 12,
            "cache": False,
        },
        "essay": {
            "type": "llm",
            "tag": "simple",
            "temperature": 0,
            "max_tokens": 320,
            "prompt": "Write a very long essay about {{ nodes.intro.output }}.",
            "checkpoint_every": 64,
            "cache": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(parallel=2, context=1024, n_threads=2))


def test_validation_errors_are_422_with_every_problem(server: LiveServer) -> None:
    bad = {
        "dag": "/dynamic/bad",
        "nodes": {
            "a": {"type": "llm", "model": "nope", "prompt": "{{ nodes.b.output }}"},
            "b": {"type": "llm", "tag": "simple", "prompt": "{{ nodes.a.output }}"},
            "c": {"type": "assert", "that": "inputs.missing > 1"},
        },
    }
    r = httpx.post(server.url + "/v1/dags", json={"dag": bad}, timeout=30)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_dag"
    nodes = {p["node"] for p in error["problems"]}
    assert {"a", "c"} <= nodes
    text = json.dumps(error["problems"])
    assert "cycle" in text and "nope" in text and "missing" in text
    # a node of an unknown type does not hide the cycle and the unknown input (issue 5)
    weird = json.loads(json.dumps(bad))
    weird["nodes"]["d"] = {"type": "weird"}
    r = httpx.post(server.url + "/v1/dags", json={"dag": weird}, timeout=30)
    found = ("'weird'", "cycle", "missing", "nope")  # the models are checked too
    assert r.status_code == 422 and all(w in r.text for w in found), r.text


def test_run_stream_list_get_and_yaml(server: LiveServer) -> None:
    doc = Path(__file__).parent.parent.joinpath("examples/dags/summary_titles.yaml").read_text()
    kinds: list[str] = []
    with httpx.stream(
        "POST", server.url + "/v1/dags", json={"dag": doc, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        run_id = r.headers["x-pcrt-run"]
        for line in r.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert {"node_started", "token", "node_finished"} <= set(kinds)
    run = httpx.get(server.url + f"/v1/dags/{run_id}").json()
    assert run["status"] == "succeeded" and len(run["outputs"]["titles"]) == 3
    listed = httpx.get(server.url + "/v1/dags").json()["data"]
    assert run_id in [r["id"] for r in listed]
    assert httpx.get(server.url + "/v1/dags/nope").status_code == 404


def test_subgraph_calls_take_the_library_from_the_body(server: LiveServer) -> None:
    callee = {
        "dag": "/lib/test/word",
        "signature": {
            "inputs": ["thing"],
            "outputs": {"word": {}, "loud": {"value": "inputs.thing | upper"}},
        },
        "nodes": {
            "word": {
                "type": "llm",
                "tag": "simple",
                "temperature": 0,
                "max_tokens": 4,
                "prompt": "One word for {{ inputs.thing }}.",
            }
        },
    }
    doc = {
        "dag": "/dynamic/calls",
        "nodes": {"c": {"type": "subgraph", "dag": "/lib/test/word", "inputs": {"thing": "salt"}}},
    }
    missing = httpx.post(server.url + "/v1/dags", json={"dag": doc}, timeout=30)
    assert missing.status_code == 422
    assert "no library subgraph /lib/test/word" in json.dumps(missing.json()["error"]["problems"])
    body = {"dag": doc, "library": [json.dumps(callee)]}  # a document's text works too
    run = httpx.post(server.url + "/v1/dags", json=body, timeout=120).json()
    assert run["status"] == "succeeded", run["error"]
    node = run["nodes"][0]
    child = httpx.get(server.url + f"/v1/dags/{node['child_run_id']}").json()
    assert child["dag"] == "/lib/test/word" and child["status"] == "succeeded"
    assert run["outputs"]["c"] == {"word": child["outputs"]["word"], "loud": "SALT"}
    assert node["ran_on"] == "local" and node["completion_tokens"] == child["tokens_used"]


def test_each_generation_is_a_usage_row_billed_to_the_runs_agent(server: LiveServer) -> None:
    """A DAG's generations are accounted as requests are: one usage row per llm or fork
    node (a subgraph call's nodes too), billed to the X-PC-Agent-ID that started the run,
    with the node's own token counts. A cache hit spent nothing and bills nothing."""
    callee = {
        "dag": "/lib/test/billed",
        "signature": {"inputs": ["thing"], "outputs": {"word": {}}},
        "nodes": {
            "word": {
                "type": "llm",
                "tag": "simple",
                "temperature": 0,
                "max_tokens": 4,
                "prompt": "One word for {{ inputs.thing }}.",
                "cache": False,
            }
        },
    }
    doc = {
        "dag": "/dynamic/billed",
        "nodes": {
            "name": {
                "type": "llm",
                "tag": "simple",
                "temperature": 0,
                "max_tokens": 6,
                "prompt": "Name a colour.",
            },
            "ideas": {
                "type": "fork",
                "tag": "simple",
                "samples": 2,
                "temperature": 0.8,
                "seed": 5,
                "max_tokens": 6,
                "cache": False,
                "prompt": "A word that rhymes with {{ nodes.name.output }}:",
            },
            "call": {
                "type": "subgraph",
                "dag": "/lib/test/billed",
                "inputs": {"thing": "{{ nodes.name.output }}"},
                "cache": False,
            },
        },
    }
    agent = f"billing-{uuid.uuid4().hex[:8]}"
    body = {"dag": doc, "library": [callee]}
    headers = {"X-PC-Agent-ID": agent}
    run = httpx.post(server.url + "/v1/dags", json=body, headers=headers, timeout=120).json()
    assert run["status"] == "succeeded", run["error"]
    nodes = {n["node_id"]: n for n in run["nodes"]}
    child_id = nodes["call"]["child_run_id"]
    (word,) = httpx.get(server.url + f"/v1/dags/{child_id}", timeout=10).json()["nodes"]
    expected = {
        f"{run['id']}/name": nodes["name"],
        f"{run['id']}/ideas": nodes["ideas"],
        f"{child_id}/word": word,
    }
    rows = server.services.usage.rows(agent=agent)
    assert sorted(r["request_id"] for r in rows) == sorted(expected)
    for row in rows:
        node = expected[row["request_id"]]
        assert (row["route"], row["status"], row["ran_on"]) == ("/v1/dags", 200, "local")
        assert row["model"] == node["model"] == "smollm2-135m"
        assert row["completion_tokens"] == node["completion_tokens"] > 0
        assert row["prompt_tokens"] == node["prompt_tokens"] > 0
        assert row["cached_tokens"] == (node["cached_tokens"] or 0)
    # the same DAG again: "name" is a cache hit (no row), the rest generate again
    again = httpx.post(server.url + "/v1/dags", json=body, headers=headers, timeout=120).json()
    assert again["status"] == "succeeded", again["error"]
    assert {n["node_id"]: n["cache_hit"] for n in again["nodes"]}["name"]
    billed_again = [r for r in server.services.usage.rows(agent=agent) if r not in rows]
    assert sorted(r["request_id"].split("/")[1] for r in billed_again) == ["ideas", "word"]
    # pcrt usage counts them with the agent's requests
    summary = {s["agent"]: s for s in server.services.usage.summary(agent=agent)}
    assert summary[agent]["requests"] == 5


def test_cancel_keeps_checkpoints_and_resume_finishes(server: LiveServer) -> None:
    started = httpx.post(
        server.url + "/v1/dags", json={"dag": ESSAY, "wait": False}, timeout=30
    ).json()
    run_id = started["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        nodes = httpx.get(server.url + f"/v1/dags/{run_id}").json()["nodes"]
        if (nodes[1]["checkpoint_tokens"] or 0) >= 64:
            break
        time.sleep(0.1)
    cancelled = httpx.delete(server.url + f"/v1/dags/{run_id}", timeout=30).json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["nodes"][1]["checkpoint_sha256"]
    done = httpx.post(server.url + f"/v1/dags/{run_id}/resume?wait=true", timeout=180).json()
    assert done["status"] == "succeeded"
    assert done["nodes"][1]["resumed_from_checkpoint"]


def _daemon(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return daemon_process(port, env, "--parallel", "2", "--ctx", "1024", "--threads", "2")


@pytest.mark.usefixtures("default_model_path")
def test_sigkill_mid_node_then_resume_in_a_new_daemon(pcrt_env: Paths) -> None:
    """The issue's crash test: finished nodes untouched, the interrupted node continues
    from its checkpoint, and the outputs equal an uninterrupted greedy run."""
    env = os.environ.copy()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    daemon = _daemon(port, env)
    try:
        reference = httpx.post(url + "/v1/dags", json={"dag": ESSAY}, timeout=300).json()
        assert reference["status"] == "succeeded"
    finally:
        daemon.kill()
        daemon.wait()
    # a fresh daemon (cold caches, like the reference), killed mid-essay
    daemon = _daemon(port, env)
    try:
        run_id = httpx.post(url + "/v1/dags", json={"dag": ESSAY, "wait": False}).json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            run = httpx.get(url + f"/v1/dags/{run_id}").json()
            if (run["nodes"][1]["checkpoint_tokens"] or 0) >= 128:
                break
            time.sleep(0.05)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    intro_before = run["nodes"][0]
    daemon = _daemon(port, env)
    try:
        seen = httpx.get(url + f"/v1/dags/{run_id}").json()
        assert seen["status"] == "interrupted"
        done = httpx.post(url + f"/v1/dags/{run_id}/resume?wait=true", timeout=300).json()
    finally:
        daemon.terminate()
        daemon.wait()
    assert done["status"] == "succeeded", done["error"]
    intro, essay = done["nodes"]
    assert intro == intro_before  # finished nodes are untouched: same record, not re-run
    assert essay["resumed_from_checkpoint"]
    checkpoint = run["nodes"][1]["checkpoint_tokens"]
    assert essay["cached_tokens"] >= essay["prompt_tokens"] + checkpoint - 1  # no recompute
    assert done["outputs"] == reference["outputs"]


def test_a_stopping_daemon_leaves_its_runs_interrupted(
    default_model_path: Path, daemon_paths: Callable[..., Paths]
) -> None:
    paths = daemon_paths()
    settings = ServerSettings(parallel=2, context=1024, n_threads=2)
    with LiveServer(settings, registry=Registry.load(paths)) as live:
        run_id = httpx.post(live.url + "/v1/dags", json={"dag": ESSAY, "wait": False}).json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            nodes = httpx.get(live.url + f"/v1/dags/{run_id}").json()["nodes"]
            if (nodes[1]["checkpoint_tokens"] or 0) >= 64:
                break
            time.sleep(0.05)
    # the server has stopped: the run waits to be resumed, it was not cancelled
    with Store(paths.db_path) as store:
        run = RunStore(store).get_run(run_id)
    assert run.status == "interrupted" and "resume" in (run.error or "")


def test_dag_cache_entries_bounds_what_the_daemon_remembers(
    default_model_path: Path, live_server: ServerFactory
) -> None:
    """``dag_cache_entries`` reaches the runner: at 1, a second deterministic node pushes
    the first out, so the first runs again instead of being a cache hit."""
    settings = ServerSettings(parallel=1, context=512, n_threads=2, dag_cache_entries=1)

    def node(prompt: str) -> dict[str, object]:
        return {
            "dag": "/dynamic/one",
            "nodes": {
                "n": {
                    "type": "llm",
                    "tag": "simple",
                    "temperature": 0,
                    "max_tokens": 2,
                    "prompt": prompt,
                }
            },
        }

    def cache_hit(url: str, prompt: str) -> bool:
        run = httpx.post(url + "/v1/dags", json={"dag": node(prompt)}, timeout=60).json()
        assert run["status"] == "succeeded", run["error"]
        return bool(run["nodes"][0]["cache_hit"])

    live = live_server(settings)
    assert live.services.dags.runner.cache_entries == 1
    assert not cache_hit(live.url, "Say one.")
    assert cache_hit(live.url, "Say one.")
    assert not cache_hit(live.url, "Say two.")  # pushes "one" out
    assert not cache_hit(live.url, "Say one.")
