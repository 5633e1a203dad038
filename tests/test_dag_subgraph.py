"""Subgraph calls on the real default model: outputs by signature, child runs, budgets,
the subgraph cache and resume. Generations are greedy and a few tokens long."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from pcrt.cache.runs import RunRecord
from pcrt.cli.main import main
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.executor import DagEvent, DagRunner
from pcrt.runtime.dag.library import Library, library_from_documents
from pcrt.runtime.paths import Paths

DESCRIBE = "/lib/test/describe"


def describe_lib(**generation: Any) -> dict[str, Any]:
    """Two nodes, the second continuing the first's context; three outputs, one computed."""
    common = {"type": "llm", "tag": "simple", "temperature": 0, "max_tokens": 6, **generation}
    return {
        "dag": DESCRIBE,
        "signature": {
            "inputs": {"thing": {"type": "string"}, "style": {"default": "plain"}},
            "outputs": {
                "first": {"type": "string"},
                "second": {},
                "summary": {"value": "inputs.thing ~ ': ' ~ nodes.second.output"},
            },
        },
        "nodes": {
            "first": {**common, "prompt": "Describe {{ inputs.thing }}, {{ inputs.style }}."},
            "second": {**common, "context": "first", "prompt": "Shorter."},
        },
    }  # fmt: skip


def caller(**nodes: dict[str, Any]) -> dict[str, Any]:
    return {"dag": "/dynamic/caller", "inputs": {"other": {"default": "the sea"}}, "nodes": nodes}


def call(cache: bool = True, **inputs: Any) -> dict[str, Any]:
    return {"type": "subgraph", "dag": DESCRIBE, "inputs": inputs, "cache": cache}


def inline(**generation: Any) -> Library:
    return library_from_documents([describe_lib(**generation)])


async def test_two_calls_give_the_callees_outputs_by_signature(
    runner: DagRunner, pcrt_env: Paths
) -> None:
    lib_file = pcrt_env.home / "lib" / "test" / "describe.yaml"
    lib_file.parent.mkdir(parents=True)
    lib_file.write_text(yaml.safe_dump(describe_lib()), encoding="utf-8")
    doc = caller(
        apple=call(thing="an apple", style="{{ 'few' }}"),
        sea=call(thing="{{ inputs.other }}"),
        check={"type": "assert", "that": "nodes.apple.output.summary.startswith('an apple: ')"},
    )
    events: list[DagEvent] = []
    run = runner.create(parse_dag(doc), {})
    final = await runner.execute(run.id, events.append)
    assert final.status == "succeeded", final.error

    nodes = {n.node_id: n for n in runner.runs.nodes(run.id)}
    children = {
        r.parent_node_id: r for r in runner.runs.list_runs(children=True) if r.parent_run_id
    }
    assert set(children) == {"apple", "sea"}
    assert [r.id for r in runner.runs.list_runs()] == [run.id]  # children are not listed
    for node_id, thing in (("apple", "an apple"), ("sea", "the sea")):
        child = children[node_id]
        assert child.dag_path == DESCRIBE and child.parent_run_id == run.id
        assert child.status == "succeeded" and child.inputs["thing"] == thing
        inner = {n.node_id: n.output for n in runner.runs.nodes(child.id)}
        record = nodes[node_id]
        assert record.output == {
            "first": inner["first"],
            "second": inner["second"],
            "summary": f"{thing}: {inner['second']}",
        }
        assert record.child_run_id == child.id and record.ran_on == "local"
        assert record.completion_tokens == child.tokens_used > 0
        assert record.seconds is not None and not record.cache_hit
    assert children["apple"].inputs["style"] == "few" and children["sea"].inputs["style"] == "plain"
    assert final.tokens_used == sum(c.tokens_used for c in children.values())
    assert final.nodes_executed == 2 + 2 + 1  # each call counts its callee's nodes
    # the callees' events reach the caller's listener, under the child's run id
    child_ids = {c.id for c in children.values()}
    streamed = {(e.run_id, e.node) for e in events if e.kind == "node_finished"}
    assert {(cid, "second") for cid in child_ids} <= streamed
    assert [e.kind for e in events].count("run_finished") == 1


async def test_a_second_identical_call_comes_from_the_subgraph_cache(runner: DagRunner) -> None:
    doc = caller(call=call(thing="a kettle"))
    first = runner.create(parse_dag(doc), {}, inline())
    assert (await runner.execute(first.id)).status == "succeeded"
    again = runner.create(parse_dag(doc), {}, inline())
    final = await runner.execute(again.id)
    assert final.status == "succeeded" and final.tokens_used == 0
    hit = runner.runs.node(again.id, "call")
    assert hit.cache_hit and hit.child_run_id is None and hit.completion_tokens == 0
    assert hit.output == runner.runs.node(first.id, "call").output
    # another input is another key; cache: false never asks
    other = runner.create(parse_dag(caller(call=call(thing="a cup"))), {}, inline())
    await runner.execute(other.id)
    assert not runner.runs.node(other.id, "call").cache_hit
    off = runner.create(parse_dag(caller(call=call(False, thing="a kettle"))), {}, inline())
    await runner.execute(off.id)
    assert runner.runs.node(off.id, "call").child_run_id is not None


async def test_the_callee_spends_the_callers_remaining_budget(runner: DagRunner) -> None:
    doc = {**caller(call=call(False, thing="a lamp")), "budget": {"max_tokens": 4}}
    run = runner.create(parse_dag(doc), {}, inline(cache=False))
    final = await runner.execute(run.id)
    assert final.status == "budget_exceeded"
    assert "max_tokens" in (final.error or "") and DESCRIBE in (final.error or "")
    child = runner.runs.get_run(runner.runs.node(run.id, "call").child_run_id or "")
    assert parse_dag(child.spec).budget.max_tokens == 4
    assert runner.runs.node(child.id, "first").status == "succeeded"  # kept


async def test_resume_continues_the_child_run_without_redoing_its_finished_nodes(
    runner: DagRunner, engines: LocalEngines
) -> None:
    doc = caller(call=call(False, thing="a violin"))
    library = inline(cache=False)
    await engines.clear_caches()  # both runs prefill cold (see test_dag_run's resume test)
    whole = runner.create(parse_dag(doc), {}, library)
    assert (await runner.execute(whole.id)).status == "succeeded"
    expected = runner.runs.node(whole.id, "call").output

    await engines.clear_caches()
    run = runner.create(parse_dag(doc), {}, library)
    task: asyncio.Task[RunRecord] | None = None

    def on_event(event: DagEvent) -> None:
        # cancelled from inside: the child stops right after its first node, every time
        if event.run_id != run.id and event.kind == "node_finished" and event.node == "first":
            assert task is not None
            task.cancel()

    task = asyncio.create_task(runner.execute(run.id, on_event))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    child_id = runner.runs.node(run.id, "call").child_run_id
    assert child_id is not None
    assert runner.runs.get_run(run.id).status == "cancelled"
    assert runner.runs.get_run(child_id).status == "cancelled"
    before = runner.runs.node(child_id, "first")
    assert before.status == "succeeded" and runner.runs.node(child_id, "second").status != (
        "succeeded"
    )

    events: list[DagEvent] = []
    final = await runner.execute(run.id, events.append)
    assert final.status == "succeeded", final.error
    assert runner.runs.node(run.id, "call").child_run_id == child_id  # the same child
    assert runner.runs.node(child_id, "first") == before  # not re-run
    restarted = {e.node for e in events if e.kind == "node_started" and e.run_id == child_id}
    assert restarted == {"second"}
    assert runner.runs.node(run.id, "call").output == expected
    assert final.tokens_used == runner.runs.get_run(child_id).tokens_used


def test_pcrt_dag_run_with_lib_and_status(default_model_path: Path, tmp_path: Path) -> None:
    lib = tmp_path / "mylib"
    lib.mkdir()
    (lib / "describe.yaml").write_text(yaml.safe_dump(describe_lib()), encoding="utf-8")
    dag = tmp_path / "dag.yaml"
    dag.write_text(yaml.safe_dump(caller(call=call(thing="salt"))), encoding="utf-8")
    result = pcrt("dag", "run", str(dag), "--lib", str(lib), "--json")
    assert result.exit_code == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["status"] == "succeeded"
    assert view["outputs"]["call"]["summary"].startswith("salt: ")
    child_id = view["nodes"][0]["child_run_id"]
    assert f"subgraph run: {child_id}" in pcrt("dag", "status", view["id"]).stdout
    assert "succeeded" in pcrt("dag", "status", child_id).stdout


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)
