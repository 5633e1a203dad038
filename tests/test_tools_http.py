"""The tool registry through a real daemon (no model loaded): ``GET /v1/pcrt/tools``,
``POST /v1/pcrt/tools/{name}/call``, their errors in the app's shape, the metrics; and
``pcrt tools list | call`` through the daemon and, with none running, from the config
file."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pcrt.cli.main import main
from pcrt.routing.peers import Peer
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.tools import ToolSettings
from tests.live_server import LiveServer, ServerFactory
from tests.tool_helpers import ROOT, mcp_stdio, server_processes
from tests.tool_http_server import ToolHttpServer

AGENT = "X-PC-Agent-ID"
SECRET = "Bearer not-to-be-listed"


@pytest.fixture(scope="module")
def http_server() -> Iterator[ToolHttpServer]:
    with ToolHttpServer() as server:
        yield server


def tools_section(http_url: str) -> dict[str, object]:
    marked = mcp_stdio(name="local", prefix="m_", env={"PCRT_TEST_WHO": "daemon"})
    marked["command"].append("pcrt-daemon-tools-test")  # told apart from other tests' servers
    return {
        "python": [
            {"name": "add", "entry_point": "tests.tool_functions:add", "idempotent": True},
            {"name": "boom", "entry_point": "tests.tool_functions:boom"},
        ],
        "http": [
            {
                "name": "weather",
                "url": f"{http_url}/weather",
                "headers_env": {"Authorization": "PCRT_TEST_WEATHER_TOKEN"},
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            }
        ],
        "mcp": [marked, {"name": "broken", "command": ["pcrt-no-such-command-here"]}],
        "permissions": {"default": ["*"], "agents": {"crawler": ["weather"]}},
    }


@pytest.fixture(scope="module")
def daemon(module_live_server: ServerFactory, http_server: ToolHttpServer) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PCRT_TEST_WEATHER_TOKEN", SECRET)  # read by the daemon at call time
        tools = ToolSettings.model_validate(tools_section(http_server.url))
        yield module_live_server(ServerSettings(tools=tools))


def test_the_listing_says_what_the_caller_may_call_and_no_secret(daemon: LiveServer) -> None:
    with daemon.http() as http:
        anyone = http.get("/v1/pcrt/tools")
        crawler = http.get("/v1/pcrt/tools", headers={AGENT: "crawler"})
    assert anyone.status_code == 200
    data = anyone.json()
    assert data["agent"] == "anonymous"
    tools = {t["name"]: t for t in data["tools"]}
    assert sorted(tools) == [
        "add",
        "boom",
        "m_add",
        "m_echo",
        "m_fail",
        "m_nap",
        "m_sleep",
        "m_whoami",
        "weather",
    ]
    weather = tools["weather"]
    assert set(weather) == {
        "name",
        "description",
        "parameters",
        "kind",
        "source",
        "idempotent",
        "timeout",
        "allowed",
        "agents",
    }
    assert (
        weather["kind"] == "http" and weather["allowed"] and weather["agents"] == ["crawler", "*"]
    )
    assert tools["m_echo"]["source"] == "local" and tools["m_echo"]["agents"] == ["*"]
    assert [p["source"] for p in data["problems"]] == ["broken"]
    allowed = {t["name"] for t in crawler.json()["tools"] if t["allowed"]}
    assert allowed == {"weather"}
    for text in (anyone.text, crawler.text):  # neither the env var's value nor the path
        assert SECRET not in text and "/weather" not in text and "daemon" not in text


def test_node_info_names_the_tools_and_a_peer_reads_them(daemon: LiveServer) -> None:
    """What peers route tool work by: names only, never where they point or secrets."""
    services = daemon.app.state.services  # /v1/pcrt/node answers signed peers only
    info = services.node.info(services.state)
    listed = info["tools"]
    assert "add" in listed and listed == sorted(listed)
    assert "http://" not in json.dumps(info["tools"])
    assert services.node.local_view().tools == frozenset(listed)
    assert "add" in info["idempotent_tools"] and set(info["idempotent_tools"]) <= set(listed)
    peer = Peer(name="box", url="http://127.0.0.1:9", kind="pcrt", source="static")
    peer.take_node_info(info)
    assert peer.view(0.0).tools == frozenset(listed)
    assert peer.view(0.0).idempotent_tools == frozenset(info["idempotent_tools"])


def test_a_call_answers_the_tool_result(daemon: LiveServer, http_server: ToolHttpServer) -> None:
    with daemon.http() as http:
        added = http.post("/v1/pcrt/tools/add/call", json={"arguments": {"a": 2, "b": 3}})
        echoed = http.post("/v1/pcrt/tools/m_whoami/call", json={})
        weather = http.post(
            "/v1/pcrt/tools/weather/call",
            json={"arguments": {"city": "Oslo"}},
            headers={AGENT: "crawler"},
        )
        failed = http.post("/v1/pcrt/tools/boom/call", json={"arguments": {"why": "x"}})
    assert added.status_code == 200
    body = added.json()
    assert {k: body[k] for k in ("tool", "ok", "text", "value", "error")} == {
        "tool": "add",
        "ok": True,
        "text": "5",
        "value": 5,
        "error": None,
    }
    assert body["seconds"] >= 0
    assert echoed.json()["text"] == "daemon"  # the MCP server the daemon started
    assert weather.json()["value"] == {"city": "Oslo", "auth": SECRET}
    assert failed.status_code == 200  # the tool's failure is its answer, for the model
    assert failed.json()["ok"] is False and "ValueError" in failed.json()["error"]


def test_refusals_are_errors_in_the_apps_shape(
    daemon: LiveServer, http_server: ToolHttpServer
) -> None:
    before = len(http_server.paths())
    with daemon.http() as http:
        unknown = http.post("/v1/pcrt/tools/nope/call", json={"arguments": {}})
        denied = http.post(
            "/v1/pcrt/tools/add/call", json={"arguments": {"a": 1}}, headers={AGENT: "crawler"}
        )
        invalid = http.post("/v1/pcrt/tools/weather/call", json={"arguments": {"city": 7}})
        not_object = http.post("/v1/pcrt/tools/weather/call", json={"arguments": [1]})
        extra = http.post("/v1/pcrt/tools/add/call", json={"arguments": {}, "args": {}})
        huge = http.post(
            "/v1/pcrt/tools/weather/call", json={"arguments": {"city": "x" * 2 * 1024**2}}
        )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "tool_not_found"
    assert "some tools are unavailable" in unknown.json()["error"]["message"]
    assert denied.status_code == 403
    assert denied.json()["error"] == {
        "message": "agent 'crawler' may not call tool 'add' (see [tools.permissions] in the "
        "daemon's config)",
        "type": "permission_error",
        "param": "name",
        "code": "tool_denied",
    }
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "arguments.city"
    assert not_object.status_code == 400 and extra.status_code == 400
    assert huge.status_code == 413  # the small routes' 1 MiB bound, before it is read
    assert len(http_server.paths()) == before  # nothing reached the tool


def test_metrics_count_calls_by_tool_and_outcome(daemon: LiveServer) -> None:
    with daemon.http() as http:
        http.post("/v1/pcrt/tools/add/call", json={"arguments": {"a": 1}})
        http.post(
            "/v1/pcrt/tools/add/call", json={"arguments": {"a": 1}}, headers={AGENT: "crawler"}
        )
        text = http.get("/metrics").text
    assert 'pcrt_tool_calls_total{outcome="ok",tool="add"}' in text
    assert 'pcrt_tool_calls_total{outcome="denied",tool="add"}' in text
    assert 'pcrt_tool_seconds_count{tool="add"}' in text
    # and usage rows, billed to the calling agent (pcrt usage shows them as tool:NAME)
    rows = daemon.app.state.services.usage.summary()
    by_agent = {r["agent"]: r for r in rows if r["model"] == "tool:add"}
    assert by_agent["anonymous"]["requests"] >= 1 and by_agent["anonymous"]["errors"] == 0
    assert by_agent["crawler"]["errors"] >= 1  # denied: a 403 row


def test_a_daemon_without_tools_lists_none(live_server: ServerFactory) -> None:
    server = live_server()
    with server.http() as http:
        assert http.get("/v1/pcrt/tools").json() == {
            "agent": "anonymous",
            "tools": [],
            "problems": [],
        }
        assert http.post("/v1/pcrt/tools/add/call", json={}).status_code == 404


def test_the_daemon_stops_its_mcp_servers() -> None:
    marker = "pcrt-daemon-stop-test"
    one = mcp_stdio(name="one")
    one["command"].append(marker)
    with LiveServer(ServerSettings(tools=ToolSettings.model_validate({"mcp": [one]}))):
        assert len(server_processes(marker)) == 1
    assert server_processes(marker) == []


# -- the CLI ---------------------------------------------------------------------------


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_through_the_daemon(daemon: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCRT_URL", daemon.url)
    listed = pcrt("tools", "list")
    assert listed.exit_code == 0, listed.output
    assert f"of the daemon at {daemon.url}" in listed.output
    assert "weather" in listed.output and "crawler" in listed.output
    assert "problem: mcp broken" in listed.output
    as_json = json.loads(pcrt("tools", "list", "--json", "--agent", "crawler").output)
    assert [t["name"] for t in as_json["tools"] if t["allowed"]] == ["weather"]

    called = pcrt("tools", "call", "add", "--args", '{"a": 20, "b": 22}')
    assert (called.exit_code, called.output) == (0, "42\n")
    denied = CliRunner().invoke(main, ["tools", "call", "add", "--agent", "crawler"])
    assert denied.exit_code == 1
    assert "error: daemon: agent 'crawler' may not call tool 'add'" in denied.output
    failed = CliRunner().invoke(main, ["tools", "call", "boom", "--args", '{"why": "x"}'])
    assert failed.exit_code == 1 and "tool failed: tool 'boom' raised ValueError" in failed.output


def test_cli_from_the_config_file_without_a_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[[tools.python]]
name = "add"
entry_point = "tests.tool_functions:add"

[[tools.mcp]]
name = "local"
command = [{json.dumps(sys.executable)}, "-m", "tests.mcp_tool_server", "pcrt-cli-test"]
cwd = {json.dumps(str(ROOT))}

[tools.permissions]
agents = {{ coder = ["echo"] }}
""",
        encoding="utf-8",
    )
    monkeypatch.setenv("PCRT_CONFIG", str(config))  # PCRT_URL: port 9, where none answers
    listed = pcrt("tools", "list")
    assert listed.exit_code == 0, listed.output
    assert "from the config file" in listed.output
    assert "echo" in listed.output and "add" in listed.output
    called = pcrt("tools", "call", "echo", "--args", '{"text": "in process"}', "--agent", "coder")
    assert (called.exit_code, called.output) == (0, "in process\n")
    as_json = pcrt("tools", "call", "add", "--args", '{"a": 1}', "--json")
    assert json.loads(as_json.output)["value"] == 1
    assert server_processes("pcrt-cli-test") == []  # the registry closed with the command


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{not json", "error: --args is not JSON: Expecting property name"),
        ("[1, 2]", "error: --args must be a JSON object"),
    ],
)
def test_cli_bad_args_is_one_line(args: str, message: str) -> None:
    result = CliRunner().invoke(main, ["tools", "call", "add", "--args", args])
    assert result.exit_code == 1
    assert result.output.startswith(message) and result.output.count("\n") == 1
    assert "Traceback" not in result.output
