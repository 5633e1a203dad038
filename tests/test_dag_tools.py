"""DAG ``tool`` and ``agent`` nodes: tools called through the registry (a real HTTP tool
on loopback, Python tools), every call recorded before it is sent and its result before
anyone reads it, so a resume never sends a recorded call again; a call lost in a crash
is sent again only when its tool is idempotent, else the run waits in
``needs_attention`` for a person's --retry-call or --skip-call. The agent node runs on
the real default model, its conversation's KV kept between steps."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from click.testing import CliRunner
from rich.console import Console

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.status import CallStatus, RunStatus
from pcrt.cache.store import Store
from pcrt.cache.tool_calls import ToolCallStore
from pcrt.cli.dag_tree import run_tree
from pcrt.cli.main import main
from pcrt.runtime.dag.context import RunContext
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.library import library_from_documents
from pcrt.runtime.dag.load import parse_dag
from pcrt.runtime.dag.offsite import peer_group, tools_needed
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.dag.spec import LlmNode
from pcrt.runtime.dag.tasks import decide_calls, run_view
from pcrt.runtime.errors import DagInvalid, InvalidRequest
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.moving import calls_tools_here
from pcrt.runtime.tools import ToolRegistry, ToolSettings
from tests.homes import isolated_paths
from tests.tool_helpers import ROOT, mcp_stdio, server_processes
from tests.tool_http_server import ToolHttpServer


@pytest.fixture
def http_tool() -> Iterator[ToolHttpServer]:
    with ToolHttpServer() as server:
        yield server


def _settings(server: ToolHttpServer, **permissions: Any) -> ToolSettings:
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    }
    return ToolSettings.model_validate(
        {
            "http": [
                {
                    "name": "weather",
                    "description": "The weather in a city now.",
                    "url": f"{server.url}/weather",
                    "parameters": weather,
                },
                {
                    "name": "weather_again",
                    "description": "The weather (safe to ask twice).",
                    "url": f"{server.url}/weather",
                    "parameters": weather,
                    "idempotent": True,
                },
                {"name": "broken", "url": f"{server.url}/fail"},
            ],
            "python": [{"name": "add", "entry_point": "tests.tool_functions:add"}],
            "permissions": permissions or {"default": ["*"]},
        }
    )


@pytest.fixture
async def tools(http_tool: ToolHttpServer) -> AsyncIterator[ToolRegistry]:
    async with ToolRegistry(_settings(http_tool, default=["*"], agents={"guest": ["add"]})) as reg:
        yield reg


def _runner(engines: Any, store: Store, tmp_path: Path, tools: ToolRegistry | None) -> DagRunner:
    return DagRunner(
        registry=engines.registry,
        runs=RunStore(store),
        blobs=BlobStore(store, tmp_path / "blobs"),
        lease=engines.lease,
        tools=tools,
        library_dirs=(),
    )


@pytest.fixture
def light_engines(tmp_path: Path) -> Iterator[LocalEngines]:
    """A registry and a lease that never loads a model (tool nodes generate nothing)."""
    local = LocalEngines(Registry.load(isolated_paths(tmp_path / "home")), parallel=1)
    yield local
    local.close()


def _tool_dag(tool: str = "weather", **arguments: Any) -> Any:
    return parse_dag(
        {
            "dag": "/dynamic/tools",
            "inputs": {"city": {"type": "string"}},
            "nodes": {
                "look": {
                    "type": "tool",
                    "tool": tool,
                    "arguments": arguments or {"city": "{{ inputs.city }}"},
                },
                "say": {
                    "type": "assert",
                    "that": "nodes.look.output.city == inputs.city",
                },
            },
        }
    )


async def test_a_tool_node_calls_once_and_its_json_is_the_output(
    tools: ToolRegistry,
    http_tool: ToolHttpServer,
    light_engines: LocalEngines,
    store: Store,
    tmp_path: Path,
) -> None:
    runner = _runner(light_engines, store, tmp_path, tools)
    run = runner.create(_tool_dag(), {"city": "Oslo"})
    final = await runner.execute(run.id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    assert runner.runs.node(run.id, "look").output == {"city": "Oslo", "auth": None}
    view = run_view(runner.runs, final)
    (call,) = view["tool_calls"]
    assert call["tool"] == "weather" and call["arguments"] == {"city": "Oslo"}
    assert call["status"] == "done" and call["ok"] and call["result_bytes"] > 0
    assert http_tool.paths() == ["/weather"]
    # pcrt dag status shows it under its node
    console = Console(record=True, width=160)
    console.print(run_tree(view, final.spec))
    shown = console.export_text()
    assert 'step 0  weather({"city": "Oslo"})  done' in shown


async def test_a_recorded_call_is_never_sent_again(
    tools: ToolRegistry,
    http_tool: ToolHttpServer,
    light_engines: LocalEngines,
    store: Store,
    tmp_path: Path,
) -> None:
    """The run stops after the call's result is recorded and before the node finished
    (a crash just then): the resume takes the result from the record."""
    runner = _runner(light_engines, store, tmp_path, tools)
    run = runner.create(_tool_dag(), {"city": "Oslo"})
    calls = ToolCallStore(store)
    calls.sent(run.id, "look", 0, 0, call_id="c", tool="weather", arguments={"city": "Oslo"})
    recorded = {"text": "{}", "value": {"city": "Oslo", "auth": "from the record"}, "error": None}
    calls.answered(run.id, "look", 0, 0, ok=True, result=recorded, seconds=0.1)
    final = await runner.execute(run.id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    assert runner.runs.node(run.id, "look").output["auth"] == "from the record"
    assert http_tool.paths() == []


async def test_a_call_lost_in_a_crash_waits_for_a_person_unless_idempotent(
    tools: ToolRegistry,
    http_tool: ToolHttpServer,
    light_engines: LocalEngines,
    store: Store,
    tmp_path: Path,
) -> None:
    runner = _runner(light_engines, store, tmp_path, tools)
    calls = ToolCallStore(store)

    # not idempotent: recorded as sent, no result (the daemon died in flight)
    run = runner.create(_tool_dag(), {"city": "Oslo"})
    calls.sent(run.id, "look", 0, 0, call_id="c", tool="weather", arguments={"city": "Oslo"})
    final = await runner.execute(run.id)
    assert final.status == RunStatus.NEEDS_ATTENTION
    assert "weather" in (final.error or "") and "--retry-call" in (final.error or "")
    assert http_tool.paths() == []  # not sent again
    again = await runner.execute(run.id)  # resumed without a decision: still waiting
    assert again.status == RunStatus.NEEDS_ATTENTION and http_tool.paths() == []
    assert calls_tools_here(runner.runs, run.id)  # it does not move to a peer

    # a person says it was done, and what it returned: the run goes on, nothing sent
    decide_calls(runner.runs, run.id, False, ({"city": "Oslo", "auth": "given"},))
    final = await runner.execute(run.id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    assert runner.runs.node(run.id, "look").output["auth"] == "given"
    (call,) = calls.of_run(run.id)
    assert call.status == CallStatus.SKIPPED and http_tool.paths() == []

    # or says send it again: sent once more
    retried = runner.create(_tool_dag(), {"city": "Oslo"})
    calls.sent(retried.id, "look", 0, 0, call_id="c", tool="weather", arguments={"city": "Oslo"})
    assert (await runner.execute(retried.id)).status == RunStatus.NEEDS_ATTENTION
    decide_calls(runner.runs, retried.id, True, None)
    assert (await runner.execute(retried.id)).status == RunStatus.SUCCEEDED
    assert http_tool.paths() == ["/weather"]
    assert calls.of_run(retried.id)[0].attempts == 2

    # idempotent: sent again at once, and once
    safe = runner.create(_tool_dag("weather_again"), {"city": "Oslo"})
    calls.sent(safe.id, "look", 0, 0, call_id="c", tool="weather_again", arguments={"city": "Oslo"})
    assert (await runner.execute(safe.id)).status == RunStatus.SUCCEEDED
    assert http_tool.paths() == ["/weather", "/weather"]

    with pytest.raises(InvalidRequest, match="no tool call waiting"):
        decide_calls(runner.runs, safe.id, True, None)


async def test_a_denied_call_is_recorded_and_never_sent(
    tools: ToolRegistry,
    http_tool: ToolHttpServer,
    light_engines: LocalEngines,
    store: Store,
    tmp_path: Path,
) -> None:
    runner = _runner(light_engines, store, tmp_path, tools)
    run = runner.create(_tool_dag(), {"city": "Oslo"}, agent="guest")  # guest: add only
    final = await runner.execute(run.id)
    assert final.status == RunStatus.FAILED
    assert "may not call tool 'weather'" in (final.error or "")
    (call,) = ToolCallStore(store).of_run(run.id)
    assert call.status == CallStatus.DENIED and http_tool.paths() == []


async def test_a_failing_tool_fails_its_node_and_budgets_bound_calls(
    tools: ToolRegistry, light_engines: LocalEngines, store: Store, tmp_path: Path
) -> None:
    runner = _runner(light_engines, store, tmp_path, tools)
    broken = parse_dag({"dag": "/dynamic/b", "nodes": {"x": {"type": "tool", "tool": "broken"}}})
    final = await runner.execute(runner.create(broken, {}).id)
    assert final.status == RunStatus.FAILED and "the tool broke" in (final.error or "")

    two = parse_dag(
        {
            "dag": "/dynamic/two",
            "budget": {"max_tool_calls": 1},
            "nodes": {
                "a": {"type": "tool", "tool": "add", "arguments": {"a": 1, "b": 2}},
                "b": {
                    "type": "tool",
                    "tool": "add",
                    "arguments": {"a": "{{ nodes.a.output }}", "b": 1},
                },
            },
        }
    )
    final = await runner.execute(runner.create(two, {}).id)
    assert final.status == RunStatus.BUDGET_EXCEEDED and "max_tool_calls" in (final.error or "")


def test_a_dag_naming_an_unknown_tool_is_refused_before_it_runs(
    tools: ToolRegistry, light_engines: LocalEngines, store: Store, tmp_path: Path
) -> None:
    runner = _runner(light_engines, store, tmp_path, tools)
    with pytest.raises(DagInvalid) as refused:
        runner.create(_tool_dag("nope"), {"city": "Oslo"})
    assert "no tool 'nope'" in str(refused.value) and "weather" in str(refused.value)
    without = _runner(light_engines, store, tmp_path, None)
    with pytest.raises(DagInvalid, match="no tools are registered"):
        without.create(_tool_dag(), {"city": "Oslo"})
    agent = {
        "dag": "/dynamic/a",
        "nodes": {
            "a": {
                "type": "agent",
                "prompt": "hi",
                "tools": ["add", "nope"],
                "tool_choice": "weather",
                "output_schema": {"type": "object"},
            }
        },
    }
    with pytest.raises(DagInvalid) as problems:
        runner.create(parse_dag(agent), {})
    text = str(problems.value)
    assert "tools[1]" in text and "tool_choice" in text and "output_schema" in text


# -- the agent node, on the real default model ---------------------------------------------


@pytest.fixture
async def agent_runner(
    engines: LocalEngines, store: Store, tmp_path: Path, tools: ToolRegistry
) -> DagRunner:
    return _runner(engines, store, tmp_path, tools)


def _agent_dag(**node: Any) -> Any:
    """An agent over the add tool; ``node`` overrides its fields."""
    return parse_dag(
        {
            "dag": "/dynamic/agent",
            "nodes": {
                "helper": {
                    "type": "agent",
                    "prompt": "What is 20 plus 22? Use the add tool.",
                    "tools": ["add"],
                    "tool_choice": "required",
                    "temperature": 0,
                    "max_tokens": 80,
                    "max_steps": 4,
                    "parallel_tool_calls": False,
                    "max_tool_calls": 1,
                    **node,
                }
            },
        }
    )


async def test_an_agent_calls_reads_the_result_and_keeps_its_kv_between_steps(
    agent_runner: DagRunner, store: Store
) -> None:
    events: list[Any] = []
    run = agent_runner.create(_agent_dag(), {})
    final = await agent_runner.execute(run.id, events.append)
    calls = ToolCallStore(store).of_run(run.id)
    assert calls and calls[0].tool == "add" and calls[0].status == CallStatus.DONE
    assert calls[0].ok and json.loads(json.dumps(calls[0].arguments))  # its JSON arguments
    assert calls[0].arguments == {"a": 20, "b": 22} and calls[0].result["value"] == 42
    # one call allowed: the next step answers with tools withheld
    assert final.status == RunStatus.SUCCEEDED, final.error
    node = agent_runner.runs.node(run.id, "helper")
    assert isinstance(node.output, str) and node.output
    (step,) = [e.data for e in events if e.kind == "tool_calls"]
    assert step["calls"][0]["tool"] == "add" and step["calls"][0]["ok"]
    # the answer's step computed only the result and the turn around it: the
    # conversation before it came from the KV of the step that called
    assert node.prompt_tokens is not None and node.cached_tokens is not None
    first = step["prompt_tokens"]
    answer_prompt = node.prompt_tokens - first
    computed_in_answer = answer_prompt - (node.cached_tokens - (first - step["computed_tokens"]))
    assert answer_prompt > first > 100
    assert computed_in_answer < 30, (answer_prompt, computed_in_answer)


def test_tool_work_goes_to_a_peer_only_with_its_tools() -> None:
    """A subgraph sent whole to a peer takes along the tool and agent nodes downstream
    only when the peer has their tools; otherwise they stay here, where theirs are."""
    spec = parse_dag(
        {
            "dag": "/dynamic/route",
            "nodes": {
                "draft": {"type": "llm", "prompt": "Draft.", "route": "peer"},
                "check": {"type": "assert", "that": "nodes.draft.output"},
                "look": {"type": "tool", "tool": "search", "needs": ["draft"]},
                "act": {
                    "type": "agent",
                    "prompt": "{{ nodes.draft.output }}",
                    "tools": ["search", "pay"],
                    "route": "peer",
                },
            },
        }
    )
    record = cast(Any, SimpleNamespace(id="r", agent=None))
    run = RunContext(cast(Any, None), record, spec, {}, lambda e: None, library_from_documents(()))
    draft = spec.nodes["draft"]
    assert isinstance(draft, LlmNode)
    assert tools_needed(run, spec.nodes["act"]) == {"search", "pay"}
    assert peer_group(run, draft) == ["draft", "check"]
    assert peer_group(run, draft, frozenset({"search"})) == ["draft", "check", "look"]
    everything = peer_group(run, draft, frozenset({"search", "pay"}))
    assert sorted(everything) == ["act", "check", "draft", "look"]


def test_pcrt_dag_run_without_a_daemon_starts_the_configured_tools(
    pcrt_env: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's local run checks the DAG against the tools the config file lists, starts
    them (an MCP server over stdio too) for the run, and stops them after."""
    config = tmp_path / "config.toml"
    mcp = _toml_entry(mcp_stdio(name="m", prefix="m_"))
    config.write_text(
        '[[tools.python]]\nname = "add"\nentry_point = "tests.tool_functions:add"\n\n'
        f"[[tools.mcp]]\n{mcp}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("PCRT_CONFIG", str(config))
    monkeypatch.chdir(ROOT)  # where the tests package imports from
    dag = tmp_path / "sum.yaml"
    dag.write_text(
        json.dumps(
            {
                "dag": "/dynamic/sum",
                "nodes": {
                    "first": {"type": "tool", "tool": "add", "arguments": {"a": 40, "b": 2}},
                    "echoed": {
                        "type": "tool",
                        "tool": "m_echo",
                        "arguments": {"text": "{{ nodes.first.output }} apples"},
                    },
                },
            }
        ),
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["dag", "run", str(dag), "--local", "--json"])
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["status"] == "succeeded", view
    assert view["outputs"]["first"] == 42 and "42 apples" in str(view["outputs"]["echoed"])
    assert [c["tool"] for c in view["tool_calls"]] == ["add", "m_echo"]
    assert server_processes() == []  # the MCP server stopped with the run

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps({"dag": "/dynamic/bad", "nodes": {"x": {"type": "tool", "tool": "nope"}}}),
        encoding="utf-8",
    )
    refused = CliRunner().invoke(main, ["dag", "run", str(bad), "--local"])
    assert refused.exit_code == 1 and "no tool 'nope'" in refused.output


def _toml_entry(values: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())


async def test_an_agents_calls_of_one_step_run_at_once_on_an_mcp_server(
    engines: LocalEngines, store: Store, tmp_path: Path
) -> None:
    """Two calls in one step to a real MCP server over stdio, each a second long: they
    overlap, and the step takes one second, not two."""
    settings = ToolSettings.model_validate({"mcp": [mcp_stdio(name="m", prefix="m_")]})
    async with ToolRegistry(settings) as tools:
        runner = _runner(engines, store, tmp_path, tools)
        dag = _agent_dag(
            prompt="Take a nap, twice.",
            tools=["m_nap"],
            parallel_tool_calls=True,
            max_tool_calls=2,
            max_tokens=200,
        )
        run = runner.create(dag, {})
        final = await runner.execute(run.id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    calls = ToolCallStore(store).of_run(run.id)
    assert [c.tool for c in calls] == ["m_nap", "m_nap"] and all(c.ok for c in calls)
    assert {c.step for c in calls} == {0}
    first, second = sorted(calls, key=lambda c: c.sent_at)
    assert second.sent_at < (first.finished_at or ""), "the step's calls did not overlap"


async def test_a_resumed_agent_replays_its_recorded_steps_without_generating_or_calling(
    agent_runner: DagRunner, store: Store, http_tool: ToolHttpServer
) -> None:
    """The daemon died after step 0's call was answered: the resume takes the call and
    its result from the record, generates only the step after it, and sends nothing."""
    run = agent_runner.create(_agent_dag(), {})
    calls = ToolCallStore(store)
    calls.sent(run.id, "helper", 0, 0, call_id="call_1", tool="add", arguments={"a": 20, "b": 22})
    calls.answered(
        run.id,
        "helper",
        0,
        0,
        ok=True,
        result={"text": "42", "value": 42, "error": None},
        seconds=0.01,
    )
    events: list[Any] = []
    final = await agent_runner.execute(run.id, events.append)
    assert final.status == RunStatus.SUCCEEDED, final.error
    assert [c.attempts for c in calls.of_run(run.id)] == [1]  # not sent again
    steps = [e.data["step"] for e in events if e.kind == "tool_calls"]
    assert steps == [0]  # replayed from the record
    tokens = [e for e in events if e.kind == "token"]
    assert tokens and all(e.data["step"] == 1 for e in tokens)  # only step 1 generated


async def test_tool_time_counts_against_the_runs_timeout(
    http_tool: ToolHttpServer, light_engines: LocalEngines, store: Store, tmp_path: Path
) -> None:
    """A tool that hangs past the run's timeout_sec stops the run as budget_exceeded."""
    settings = ToolSettings.model_validate(
        {"http": [{"name": "hang", "url": f"{http_tool.url}/hang", "timeout": 30}]}
    )
    async with ToolRegistry(settings) as hanging:
        runner = _runner(light_engines, store, tmp_path, hanging)
        dag = parse_dag(
            {
                "dag": "/dynamic/hang",
                "budget": {"timeout_sec": 0.5},
                "nodes": {"wait": {"type": "tool", "tool": "hang"}},
            }
        )
        started = time.perf_counter()
        final = await runner.execute(runner.create(dag, {}).id)
    assert final.status == RunStatus.BUDGET_EXCEEDED and "timeout_sec" in (final.error or "")
    assert time.perf_counter() - started < 5


async def test_an_agents_named_tool_choice_calls_that_tool_first(
    agent_runner: DagRunner, store: Store, http_tool: ToolHttpServer
) -> None:
    dag = _agent_dag(prompt="What is the weather in Oslo?", tools=["add", "weather"])
    dag = parse_dag(
        {
            **dag.document(),
            "nodes": {"helper": {**dag.document()["nodes"]["helper"], "tool_choice": "weather"}},
        }
    )
    run = agent_runner.create(dag, {})
    final = await agent_runner.execute(run.id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    (call,) = ToolCallStore(store).of_run(run.id)
    assert call.tool == "weather" and http_tool.paths() == ["/weather"]


LOOK_UP = {
    "dag": "/lib/look_up",
    "signature": {"inputs": {"city": {"type": "string"}}, "outputs": ["look"]},
    "nodes": {
        "look": {"type": "tool", "tool": "weather", "arguments": {"city": "{{ inputs.city }}"}}
    },
}


async def test_a_subgraph_that_calls_tools_is_never_cached_and_asks_its_caller(
    tools: ToolRegistry,
    http_tool: ToolHttpServer,
    light_engines: LocalEngines,
    store: Store,
    tmp_path: Path,
) -> None:
    """A callee with a tool node acts on the world: two equal calls send two requests.
    And a call lost in a crash inside it stops the caller as needs_attention; the
    person's word on the caller settles the child's call."""
    runner = _runner(light_engines, store, tmp_path, tools)
    library = library_from_documents([LOOK_UP])
    caller = {
        "dag": "/dynamic/caller",
        "nodes": {"sub": {"type": "subgraph", "dag": "/lib/look_up", "inputs": {"city": "Oslo"}}},
    }
    for _ in range(2):
        final = await runner.execute(runner.create(parse_dag(caller), {}, library).id)
        assert final.status == RunStatus.SUCCEEDED, final.error
    assert http_tool.paths() == ["/weather", "/weather"]

    run = runner.create(parse_dag(caller), {}, library)
    first = await runner.execute(run.id)  # runs the child; then stage a crash inside it
    child_id = runner.runs.node(run.id, "sub").child_run_id
    assert first.status == RunStatus.SUCCEEDED and child_id
    calls = ToolCallStore(store)
    with store.db.conn as conn:  # as if both had stopped mid-call
        conn.execute("delete from tool_calls where run_id = ?", (child_id,))
        conn.execute(
            "update runs set status = 'interrupted' where id in (?, ?)", (run.id, child_id)
        )
        conn.execute(
            "update nodes set status = 'interrupted' where run_id in (?, ?)", (run.id, child_id)
        )
    calls.sent(child_id, "look", 0, 0, call_id="x", tool="weather", arguments={"city": "Oslo"})
    stopped = await runner.execute(run.id)
    assert stopped.status == RunStatus.NEEDS_ATTENTION, stopped.error
    assert "weather" in (stopped.error or "") and f"resume {run.id}" in (stopped.error or "")
    decide_calls(runner.runs, run.id, False, ({"city": "Oslo", "auth": "by hand"},))
    done = await runner.execute(run.id)
    assert done.status == RunStatus.SUCCEEDED, done.error
    assert len(http_tool.paths()) == 3  # the lost call was never sent again


async def test_parallel_tool_nodes_cannot_both_take_the_last_call(
    tools: ToolRegistry,
    http_tool: ToolHttpServer,
    light_engines: LocalEngines,
    store: Store,
    tmp_path: Path,
) -> None:
    """The run's max_tool_calls is counted in the transaction that records a call: two
    nodes starting at once with one call left send one call, not two."""
    runner = _runner(light_engines, store, tmp_path, tools)
    weather = {"type": "tool", "tool": "weather", "arguments": {"city": "Oslo"}}
    dag = parse_dag(
        {
            "dag": "/dynamic/both",
            "budget": {"max_tool_calls": 1},
            "nodes": {"a": weather, "b": {**weather, "arguments": {"city": "Rome"}}},
        }
    )
    final = await runner.execute(runner.create(dag, {}).id)
    assert final.status == RunStatus.BUDGET_EXCEEDED and "max_tool_calls" in (final.error or "")
    assert len(ToolCallStore(store).of_run(final.id)) == 1 and len(http_tool.paths()) == 1
