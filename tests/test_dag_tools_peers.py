"""Tool work goes where the tools are: two live daemons on loopback (mDNS on 127.0.0.1
only), the tools registered on one. A tool node of a run on the other runs on the peer
that has its tool as idempotent; a tool the peer has but not as idempotent is not offered
(a call lost with a failing peer could go twice), and a tool nobody has is refused when
the run is created."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcrt.routing.settings import PeerSettings
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.tools import ToolSettings
from tests.homes import isolated_paths
from tests.live_server import LiveServer
from tests.peering import unique_name, wait_for

LOOPBACK = ["127.0.0.1"]
TOOLS = ToolSettings.model_validate(
    {
        "python": [
            {"name": "add", "entry_point": "tests.tool_functions:add", "idempotent": True},
            {"name": "greet", "entry_point": "tests.tool_functions:greet"},  # not idempotent
        ]
    }
)


def _daemon(tmp_path: Path, name: str, key: str, tools: ToolSettings) -> LiveServer:
    peers = PeerSettings(
        lan=True, interfaces=LOOPBACK, name=name, cluster_key=key, health_interval=0.5
    )
    registry = Registry.load(isolated_paths(tmp_path / name))
    return LiveServer(ServerSettings(peers=peers, tools=tools), registry=registry)


@pytest.mark.usefixtures("default_model_path")
def test_a_tool_node_runs_on_the_peer_that_has_its_tool(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    tooled, edge_name = unique_name("tooled"), unique_name("edge")
    with (
        _daemon(tmp_path, tooled, key, TOOLS) as peer,
        _daemon(tmp_path, edge_name, key, ToolSettings()) as edge,
    ):
        wait_for(lambda: _knows_tools(edge, tooled), 15, "edge sees the peer's tools")
        dag = {
            "dag": "/dynamic/sum",
            "nodes": {
                "sum": {"type": "tool", "tool": "add", "arguments": {"a": 40, "b": 2}},
                "check": {"type": "assert", "that": "nodes.sum.output == 42"},
            },
        }
        run = httpx.post(edge.url + "/v1/dags", json={"dag": dag}, timeout=60).json()
        assert run["status"] == "succeeded", run.get("error")
        node = next(n for n in run["nodes"] if n["node_id"] == "sum")
        assert node["ran_on"] == tooled and node["output"] == 42
        peer_runs = peer.services.dags.runner.runs
        (there,) = peer_runs.list_runs()
        assert [c["tool"] for c in _calls(peer, there.id)] == ["add"]  # made there
        (call,) = run["tool_calls"]  # and recorded here too: status, budget
        assert (call["tool"], call["arguments"], call["ok"]) == ("add", {"a": 40, "b": 2}, True)

        # greet is the peer's, but not idempotent: never offered to other nodes' runs
        greet = {
            "dag": "/dynamic/greet",
            "nodes": {"hi": {"type": "tool", "tool": "greet", "arguments": {"name": "Ada"}}},
        }
        refused = httpx.post(edge.url + "/v1/dags", json={"dag": greet}, timeout=60)
        assert refused.status_code == 422 and "no tool 'greet'" in refused.text


def _calls(server: LiveServer, run_id: str) -> list[dict[str, Any]]:
    view: dict[str, Any] = httpx.get(server.url + f"/v1/dags/{run_id}", timeout=10).json()
    calls: list[dict[str, Any]] = view["tool_calls"]
    return calls


def _knows_tools(server: LiveServer, peer: str) -> bool:
    return "add" in server.services.dags.runner.known_tools()
