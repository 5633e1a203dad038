"""A subgraph call's routing hints on two live daemons: the callee's nodes go where the
calling node's ``complexity`` or ``route`` sends them. Discovery runs on 127.0.0.1 only;
both daemons serve the real default model."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcrt.routing.settings import PeerSettings
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.settings import ServerSettings
from tests.homes import isolated_paths
from tests.live_server import LiveServer
from tests.peering import unique_name, wait_for

# both daemons load the default model (conftest marks the tests "model")
pytestmark = pytest.mark.usefixtures("default_model_path")

LOOPBACK = ["127.0.0.1"]  # mDNS never leaves this machine's loopback in tests
ROUTED = "/lib/test/routed"


def routed_lib() -> dict[str, Any]:
    """Two nodes that leave routing to their caller (the second continues the first), and
    an independent one that insists on running where it is called."""
    common = {"type": "llm", "tag": "simple", "temperature": 0}
    return {
        "dag": ROUTED,
        "signature": {"inputs": ["thing"], "outputs": ["first", "second", "here"]},
        "nodes": {
            "first": {**common, "max_tokens": 6, "prompt": "Describe {{ inputs.thing }}."},
            "second": {**common, "max_tokens": 6, "context": "first", "prompt": "Shorter."},
            "here": {
                **common,
                "max_tokens": 4,
                "route": "local",
                "prompt": "Name {{ inputs.thing }}.",
            },
        },
    }


def calling(**hints: str) -> dict[str, Any]:
    call = {"type": "subgraph", "dag": ROUTED, "inputs": {"thing": "a harp"}, **hints}
    return {"dag": "/dynamic/calls", "nodes": {"call": call}}


def test_a_calls_hints_send_its_callee_to_a_peer_or_keep_it_here(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    strong, edge_name = unique_name("strong"), unique_name("edge")
    with _daemon(tmp_path, strong, key) as peer, _daemon(tmp_path, edge_name, key) as edge:
        wait_for(lambda: _in_rotation(edge, strong), 10, "edge trusts the strong peer")
        edge_runs = edge.services.dags.runner.runs
        peer_runs = peer.services.dags.runner.runs

        # complexity: high sends the callee's unhinted nodes to the peer, whole; the node
        # that says route: local stays
        agent = unique_name("agent")
        high = _run(edge, calling(complexity="high"), agent)
        child = edge_runs.node(high["id"], "call").child_run_id
        assert child is not None
        ran_on = {n.node_id: n.ran_on for n in edge_runs.nodes(child)}
        assert ran_on == {"first": strong, "second": strong, "here": "local"}
        remote = peer_runs.list_runs()
        assert len(remote) == 1  # one run on the peer holds both nodes
        sent = {n.node_id: n for n in peer_runs.nodes(remote[0].id)}
        assert set(sent) == {"first", "second"}
        # each generation is billed to the agent on both machines: here with where it ran,
        # on the peer (which got the agent with the subgraph) as its own local work
        billed = {r["request_id"]: r for r in edge.services.usage.rows(agent=agent)}
        assert {k: r["ran_on"] for k, r in billed.items()} == {
            f"{child}/first": strong,
            f"{child}/second": strong,
            f"{child}/here": "local",
        }
        peer_rows = {r["request_id"]: r for r in peer.services.usage.rows(agent=agent)}
        assert {k: r["ran_on"] for k, r in peer_rows.items()} == {
            f"{remote[0].id}/first": "local",
            f"{remote[0].id}/second": "local",
        }
        for node_id in ("first", "second"):
            here, there = billed[f"{child}/{node_id}"], peer_rows[f"{remote[0].id}/{node_id}"]
            assert here["completion_tokens"] == there["completion_tokens"] > 0
        assert sent["second"].output == high["outputs"]["call"]["second"]
        assert edge_runs.node(child, "first").routing["reason"].startswith(f"peer {strong}")

        # route: local keeps all of it here, with the peer there and willing
        local = _run(edge, calling(route="local"))
        child = edge_runs.node(local["id"], "call").child_run_id
        assert child is not None
        assert {n.ran_on for n in edge_runs.nodes(child)} == {"local"}
        assert len(peer_runs.list_runs()) == 1
        # the same greedy model on both machines: the same answer, wherever it ran
        assert local["outputs"]["call"] == high["outputs"]["call"]

        # a call routed like a node the peer takes goes along with it, and its callee runs
        # there, never sent back; a call that says route: local stays out of that group
        topic = {
            "type": "llm",
            "complexity": "high",
            "temperature": 0,
            "max_tokens": 4,
            "prompt": "Name one instrument.",
        }
        with_topic = {"thing": "{{ nodes.topic.output }}"}
        chain = {
            "dag": "/dynamic/chain",
            "nodes": {
                "topic": topic,
                "along": {
                    "type": "subgraph",
                    "dag": ROUTED,
                    "inputs": with_topic,
                    "complexity": "high",
                },
                "kept": {"type": "subgraph", "dag": ROUTED, "inputs": with_topic, "route": "local"},
            },
        }
        chain_agent = unique_name("chain")
        chained = _run(edge, chain, chain_agent)
        nodes = {n.node_id: n for n in edge_runs.nodes(chained["id"])}
        assert {k: n.ran_on for k, n in nodes.items()} == {
            "topic": strong,
            "along": strong,
            "kept": "local",
        }
        # the call that ran on the peer is one row here with its callee's tokens (its
        # generations are rows there); the call kept here is billed through its nodes
        billed = {r["request_id"]: r for r in edge.services.usage.rows(agent=chain_agent)}
        kept_child = nodes["kept"].child_run_id
        assert set(billed) == {f"{chained['id']}/topic", f"{chained['id']}/along"} | {
            f"{kept_child}/{n}" for n in ("first", "second", "here")
        }
        along = billed[f"{chained['id']}/along"]
        assert (along["ran_on"], along["model"]) == (strong, f"subgraph {ROUTED}")
        assert along["completion_tokens"] == nodes["along"].completion_tokens > 0
        assert nodes["along"].child_run_id is None  # its child run is on the peer
        kept = nodes["kept"].child_run_id
        assert kept is not None
        assert {n.ran_on for n in edge_runs.nodes(kept)} == {"local"}
        assert len(peer_runs.list_runs()) == 2
        on_peer = [r for r in peer_runs.list_runs(children=True) if r.parent_node_id == "along"]
        assert len(on_peer) == 1
        assert {n.ran_on for n in peer_runs.nodes(on_peer[0].id)} == {
            peer.services.dags.runner.ran_on
        }
        # a branch fork sent along with its branches (one group: both read "place") bills
        # nothing of its own
        fork_agent = unique_name("fork")
        pair = {"type": "llm", "complexity": "high", "temperature": 0, "max_tokens": 3}
        forked = _run(
            edge,
            {
                "dag": "/dynamic/forked",
                "nodes": {
                    "place": {**pair, "prompt": "Name a lake."},
                    "bird": {**pair, "prompt": "A bird of {{ nodes.place.output }}:"},
                    "fish": {**pair, "prompt": "A fish of {{ nodes.place.output }}:"},
                    "both": {"type": "fork", "branches": ["bird", "fish"]},
                },
            },
            fork_agent,
        )
        ran = {n.node_id: n.ran_on for n in edge_runs.nodes(forked["id"])}
        rows = edge.services.usage.rows(agent=fork_agent)
        assert sorted(r["request_id"] for r in rows) == [
            f"{forked['id']}/{n}" for n in ("bird", "fish", "place")
        ], ran
        assert {r["ran_on"] for r in rows} == {strong} and ran["both"] == strong
        # nothing came back: the edge holds its own runs only
        assert {r.id for r in edge_runs.list_runs()} == {
            high["id"],
            local["id"],
            chained["id"],
            forked["id"],
        }


def _run(edge: LiveServer, dag: dict[str, Any], agent: str = "anonymous") -> dict[str, Any]:
    body = {"dag": dag, "library": [routed_lib()]}
    headers = {"X-PC-Agent-ID": agent}
    run: dict[str, Any] = httpx.post(
        edge.url + "/v1/dags", json=body, headers=headers, timeout=120
    ).json()
    assert run["status"] == "succeeded", run.get("error")
    return run


def _daemon(tmp_path: Path, name: str, key: str) -> LiveServer:
    paths = isolated_paths(tmp_path / name)
    peers = PeerSettings(
        lan=True, interfaces=LOOPBACK, name=name, cluster_key=key, health_interval=0.5
    )
    return LiveServer(ServerSettings(peers=peers), registry=Registry.load(paths))


def _in_rotation(server: LiveServer, peer: str) -> bool:
    answer = httpx.get(server.url + "/v1/pcrt/peers", timeout=5).json()
    return any(p["name"] == peer and p.get("in_rotation") for p in answer["peers"])
