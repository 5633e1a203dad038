"""The tool registry over real tools: an MCP server (stdio and streamable HTTP) written
with the SDK, an HTTP server, Python callables. What a call refuses before sending, what
a failing or hanging tool gives back, and that nothing outlives the registry."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator

import psutil
import pytest
import pytest_asyncio

from pcrt.runtime.errors import InvalidRequest, ToolDenied, ToolNotFound
from pcrt.runtime.tools import ToolRegistry, ToolSettings
from tests.tool_helpers import mcp_http_server, mcp_stdio, server_processes, tool_config
from tests.tool_http_server import ToolHttpServer

SLACK = 1.5  # seconds a timed-out call may take past its bound on a busy 2-core machine


@pytest.fixture(scope="module")
def http_server() -> Iterator[ToolHttpServer]:
    with ToolHttpServer() as server:
        yield server


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    with mcp_http_server() as url:
        yield url


@pytest.fixture(scope="module")
def observed() -> list[tuple[str, str, float]]:
    return []


@pytest_asyncio.fixture(scope="module")
async def registry(
    http_server: ToolHttpServer, mcp_url: str, observed: list[tuple[str, str, float]]
) -> AsyncIterator[ToolRegistry]:
    settings = ToolSettings.model_validate(tool_config(http_server.url, mcp_url))

    def on_call(name: str, outcome: str, seconds: float, agent: str | None) -> None:
        observed.append((name, outcome, seconds))

    async with ToolRegistry(settings, on_call=on_call) as tools:
        yield tools


def test_the_listing_has_every_kind_and_the_problems(registry: ToolRegistry) -> None:
    tools = {t.name: t for t in registry.tools()}
    assert sorted(tools) == [
        "add",
        "boom",
        "echo",
        "fail",
        "greet",
        "nap",
        "not_json",
        "page_big",
        "page_big_chunked",
        "page_fail",
        "page_hang",
        "page_text",
        "r_add",
        "r_echo",
        "r_fail",
        "r_nap",
        "r_sleep",
        "r_whoami",
        "search",
        "sleep",
        "slow",
        "unreachable",
        "weather",
        "whoami",
    ]
    assert (tools["add"].kind, tools["add"].source) == ("python", "tests.tool_functions:add")
    assert tools["add"].description == "Add two integers."  # the docstring's first paragraph
    assert tools["add"].parameters["required"] == ["a"]  # from the signature: b has a default
    assert tools["weather"].kind == "http" and tools["weather"].source.startswith("127.0.0.1:")
    assert (tools["echo"].kind, tools["echo"].source) == ("mcp", "local")
    assert tools["r_echo"].source == "remote" and tools["r_echo"].parameters["type"] == "object"
    # idempotent: per tool for HTTP and Python, by the server's own names or all for MCP
    assert tools["weather"].idempotent and not tools["search"].idempotent
    assert tools["echo"].idempotent and not tools["sleep"].idempotent
    assert tools["r_sleep"].idempotent
    assert registry.get("weather") is tools["weather"]

    problems = {(p.source, p.tool): p.error for p in registry.problems}
    assert "No such file or directory" in problems[("broken", None)]
    # the MCP server's `add` (no prefix) meets the Python tool of that name: the first stays
    assert "taken by a python tool" in problems[("local", "add")]


def test_an_agent_sees_only_what_its_patterns_allow(registry: ToolRegistry) -> None:
    names = [t.name for t in registry.tools("crawler")]
    assert names == ["search", "weather"]
    assert [t.name for t in registry.tools("coder")] == [
        "echo",
        "r_add",
        "r_echo",
        "r_fail",
        "r_nap",
        "r_sleep",
        "r_whoami",
    ]
    assert registry.tools("nobody") == []
    assert len(registry.tools("someone-else")) == len(registry.tools())  # default ["*"]
    assert registry.allowed("crawler", "weather") and not registry.allowed("crawler", "echo")
    assert registry.allowed(None, "echo")  # the daemon's own code names no agent
    assert registry.agents_for("weather") == ["crawler", "*"]
    assert registry.agents_for("r_add") == ["coder", "*"]


async def test_mcp_over_stdio(registry: ToolRegistry) -> None:
    echoed = await registry.call("echo", {"text": "hé"})
    assert (echoed.ok, echoed.text, echoed.value) == (True, "hé", {"result": "hé"})
    assert echoed.error is None and echoed.seconds > 0
    who = await registry.call("whoami", {})
    assert who.text == "pcrt"  # the configured env reached the server process
    failed = await registry.call("fail", {"why": "testing"})
    assert not failed.ok and failed.error and failed.text == failed.error


async def test_mcp_over_streamable_http(registry: ToolRegistry) -> None:
    added = await registry.call("r_add", {"a": 2, "b": 40}, agent="coder")
    assert (added.ok, added.text, added.value) == (True, "42", {"result": 42})
    failed = await registry.call("r_fail", {"why": "testing"})
    assert not failed.ok


@pytest.mark.parametrize("name", ["sleep", "r_sleep"])
async def test_a_hanging_mcp_tool_times_out_and_the_session_goes_on(
    registry: ToolRegistry, name: str
) -> None:
    started = time.monotonic()
    result = await registry.call(name, {"seconds": 30}, timeout=0.5)
    took = time.monotonic() - started
    assert not result.ok and result.error == f"tool {name!r} timed out after 0.5 s"
    assert 0.45 <= took < 0.5 + SLACK
    after = await registry.call(name.replace("sleep", "echo"), {"text": "still here"})
    assert after.ok and after.text == "still here"


async def test_python_callables(registry: ToolRegistry) -> None:
    added = await registry.call("add", {"a": 1, "b": 2})
    assert (added.ok, added.text, added.value) == (True, "3", 3)
    greeted = await registry.call("greet", {"name": "Ada"})
    assert greeted.value == {"greeting": "hello Ada"}
    assert greeted.text == '{"greeting": "hello Ada"}'
    boom = await registry.call("boom", {"why": "on purpose"})
    assert not boom.ok and boom.error == "tool 'boom' raised ValueError: boom: on purpose"
    odd = await registry.call("not_json", {})
    assert not odd.ok and "not JSON" in (odd.error or "")


async def test_a_blocking_python_tool_times_out_without_blocking_the_loop(
    registry: ToolRegistry,
) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    result = await registry.call("slow", {"seconds": 3})  # its own timeout: 0.5 s
    took = time.monotonic() - started
    ticker.cancel()
    assert not result.ok and "timed out after 0.5 s" in result.text
    assert took < 0.5 + SLACK and ticks >= 5  # the loop ran while the thread slept


async def test_http_post_sends_json_and_headers_from_the_environment(
    registry: ToolRegistry, http_server: ToolHttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PCRT_TEST_WEATHER_TOKEN", "Bearer s3cret")
    result = await registry.call("weather", {"city": "Oslo"})
    assert result.ok and result.value == {"city": "Oslo", "auth": "Bearer s3cret"}
    seen = http_server.last("/weather")
    assert seen.method == "POST" and seen.headers["content-type"] == "application/json"

    monkeypatch.delenv("PCRT_TEST_WEATHER_TOKEN")  # read at each call: gone now
    before = len(http_server.paths())
    missing = await registry.call("weather", {"city": "Oslo"})
    assert not missing.ok and "PCRT_TEST_WEATHER_TOKEN" in missing.text
    assert "s3cret" not in missing.text
    assert len(http_server.paths()) == before  # nothing was sent without it


async def test_http_get_sends_query_parameters(
    registry: ToolRegistry, http_server: ToolHttpServer
) -> None:
    result = await registry.call("search", {"q": "llama", "tags": ["a", "b"], "exact": True})
    assert result.ok and result.value == {"q": "llama", "tags": ["a", "b"], "exact": "true"}
    assert http_server.last("/search").method == "GET"
    text = await registry.call("page_text", {})
    assert (text.ok, text.text, text.value) == (True, "plain words", None)


async def test_http_failures_are_results_the_model_reads(registry: ToolRegistry) -> None:
    failed = await registry.call("page_fail", {})
    assert not failed.ok and failed.error == "tool 'page_fail': HTTP 500: the tool broke"
    refused = await registry.call("unreachable", {})
    assert not refused.ok and "cannot reach 127.0.0.1:" in (refused.error or "")
    for name in ("page_big", "page_big_chunked"):  # 5 MiB, over the 1 MiB default
        big = await registry.call(name, {})
        assert not big.ok and "over 1048576 bytes" in (big.error or "")
        assert len(big.text) < 1000

    started = time.monotonic()
    hung = await registry.call("page_hang", {})  # its own timeout: 0.5 s
    assert not hung.ok and hung.error == "tool 'page_hang' timed out after 0.5 s"
    assert time.monotonic() - started < 0.5 + SLACK


async def test_refusals_come_before_anything_is_sent(
    registry: ToolRegistry, http_server: ToolHttpServer
) -> None:
    before = len(http_server.paths())
    with pytest.raises(ToolDenied, match="agent 'crawler' may not call tool 'page_fail'"):
        await registry.call("page_fail", {}, agent="crawler")
    with pytest.raises(ToolDenied):
        await registry.call("weather", {"city": "Oslo"}, agent="nobody")
    with pytest.raises(InvalidRequest) as bad:
        await registry.call("weather", {"city": 3})
    assert bad.value.param == "arguments.city"
    assert str(bad.value) == "tool 'weather': arguments.city: 3 is not of type 'string'"
    with pytest.raises(InvalidRequest, match="'city' is a required property"):
        await registry.call("weather", {})
    with pytest.raises(InvalidRequest) as nested:
        await registry.call("search", {"tags": ["a", 1]})
    assert nested.value.param == "arguments.tags[1]"
    with pytest.raises(InvalidRequest, match="arguments must be a JSON object"):
        await registry.call("search", ["not", "an", "object"])
    with pytest.raises(ToolNotFound, match="no tool 'nope'"):
        await registry.call("nope", {})
    assert len(http_server.paths()) == before  # the server saw none of them


async def test_the_observer_hears_every_outcome(
    registry: ToolRegistry, observed: list[tuple[str, str, float]]
) -> None:
    observed.clear()
    await registry.call("add", {"a": 1})
    await registry.call("boom", {"why": "x"})
    await registry.call("sleep", {"seconds": 5}, timeout=0.2)
    with pytest.raises(ToolDenied):
        await registry.call("add", {"a": 1}, agent="nobody")
    with pytest.raises(InvalidRequest):
        await registry.call("add", {"a": "one"})
    with pytest.raises(ToolNotFound):
        await registry.call("nope", {})  # no label for a name that is not a tool
    assert [(name, outcome) for name, outcome, _ in observed] == [
        ("add", "ok"),
        ("boom", "error"),
        ("sleep", "timeout"),
        ("add", "denied"),
        ("add", "invalid"),
    ]
    assert observed[2][2] >= 0.2


async def test_no_server_process_outlives_the_registry() -> None:
    marker = "pcrt-orphan-test"  # its command line, told apart from the module's servers
    one = mcp_stdio(name="one")
    one["command"].append(marker)
    settings = ToolSettings.model_validate({"mcp": [one]})
    started = time.monotonic()
    async with ToolRegistry(settings) as tools:
        assert time.monotonic() - started < 10
        running = server_processes(marker)
        assert len(running) == 1 and running[0].is_running()
        assert (await tools.call("echo", {"text": "hi"})).ok
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    with pytest.raises(psutil.NoSuchProcess):  # gone and reaped, not a zombie
        running[0].status()
    assert server_processes(marker) == []


async def test_a_server_that_does_not_answer_is_a_problem_within_its_connect_timeout() -> None:
    mute = [sys.executable, "-c", "import time; time.sleep(60)  # pcrt-mute-test"]
    settings = ToolSettings.model_validate(
        {
            "mcp": [
                {"name": "mute", "command": mute, "connect_timeout": 0.5},
                {
                    "name": "dies",
                    "command": [sys.executable, "-c", "import sys; sys.exit('no config!')"],
                },
                {
                    "name": "needs_token",
                    "url": "http://127.0.0.1:9/mcp",
                    "headers_env": {"Authorization": "PCRT_TEST_UNSET_TOKEN"},
                },
            ],
            "python": [
                {"name": "add", "entry_point": "tests.tool_functions:add"},
                {"name": "gone", "entry_point": "tests.no_such_module:f"},
                {"name": "number", "entry_point": "tests.tool_functions:NOT_CALLABLE"},
            ],
        }
    )
    started = time.monotonic()
    async with ToolRegistry(settings) as tools:
        assert time.monotonic() - started < 0.5 + SLACK
        assert [t.name for t in tools.tools()] == ["add"]  # the rest still serve
        problems = {(p.source, p.tool): p.error for p in tools.problems}
        assert problems[("mute", None)] == "did not start within 0.5 s"
        assert "no config!" in problems[("dies", None)]  # its stderr says why
        assert (
            "PCRT_TEST_UNSET_TOKEN (header Authorization) is not set"
            in (problems[("needs_token", None)])
        )
        assert "ModuleNotFoundError" in problems[("tests.no_such_module:f", "gone")]
        assert "not a callable" in problems[("tests.tool_functions:NOT_CALLABLE", "number")]
        with pytest.raises(ToolNotFound, match="unavailable"):
            await tools.call("echo", {})
    assert server_processes("pcrt-mute-test") == []  # the mute one was stopped too


async def test_a_server_that_dies_fails_its_calls_at_once() -> None:
    marker = "pcrt-dies-test"
    one = mcp_stdio(name="one")
    one["command"].append(marker)
    async with ToolRegistry(ToolSettings.model_validate({"mcp": [one]})) as tools:
        assert (await tools.call("echo", {"text": "alive"})).ok
        [process] = server_processes(marker)
        process.kill()  # not waited for here: the SDK's child watcher reaps it
        with contextlib.suppress(psutil.NoSuchProcess):
            while process.status() != psutil.STATUS_ZOMBIE:
                await asyncio.sleep(0.02)
        started = time.monotonic()
        result = await tools.call("echo", {"text": "anyone?"}, timeout=10)
        assert time.monotonic() - started < 2  # not at its timeout
        assert not result.ok and "MCP server 'one'" in (result.error or "")


async def test_no_tools_starts_at_once() -> None:
    started = time.monotonic()
    async with ToolRegistry(ToolSettings()) as tools:
        assert tools.tools() == [] and tools.problems == []
    assert time.monotonic() - started < 0.1
