"""Subgraph calls on the real default model: outputs by signature, child runs, budgets,
the subgraph cache, resume, and the routing hints a call gives its callee. Generations are
greedy and a few tokens long."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunRecord, RunStore
from pcrt.cache.store import Store
from pcrt.cli.main import main
from pcrt.routing.policy import Candidate, Decision, ModelOffer, NodeView, Work, decide
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.library import Library, library_from_documents
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.errors import PeerError
from pcrt.runtime.models.registry import Registry
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
    }


def caller(**nodes: dict[str, Any]) -> dict[str, Any]:
    return {"dag": "/dynamic/caller", "inputs": {"other": {"default": "the sea"}}, "nodes": nodes}


def call(cache: bool = True, hints: dict[str, str] | None = None, **inputs: Any) -> dict[str, Any]:
    return {"type": "subgraph", "dag": DESCRIBE, "inputs": inputs, "cache": cache, **(hints or {})}


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


# -- routing hints of a call (issue 6) -------------------------------------------------------


class NoPeers:
    """Peers switched on and none found: the real routing policy over this machine alone.
    It keeps every piece of work the runner asks it about; nothing may reach a peer."""

    enabled = True

    def __init__(self, registry: Registry) -> None:
        offers = tuple(
            ModelOffer(name=e.name, aliases=e.aliases, tags=e.tags)
            for e in registry.entries.values()
        )
        self.local = NodeView(name="local", kind="local", models=offers)
        self.asked: list[Work] = []

    def decide(self, work: Work) -> Decision:
        self.asked.append(work)
        return decide(work, self.local, [])

    def known_names(self) -> tuple[set[str], set[str]]:
        return set(), set()

    def known_tools(self) -> set[str]:
        return set()

    def failed(self, exc: PeerError) -> None:
        raise AssertionError(f"no peer to fail: {exc}")

    async def chat(
        self,
        candidate: Candidate,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        on_text: Callable[[int, str], None],
    ) -> Any:
        raise AssertionError(f"no peer to chat with: {candidate}")

    async def subgraph(
        self,
        candidate: Candidate,
        payload: dict[str, Any],
        timeout: float | None,
        agent: str | None = None,
    ) -> dict[str, Any]:
        raise AssertionError(f"no peer to send a subgraph to: {candidate}")


@pytest.fixture
async def routed(engines: LocalEngines, store: Store, tmp_path: Path) -> DagRunner:
    """A runner whose peers are on, with none there (``NoPeers``)."""
    return DagRunner(
        registry=engines.registry,
        runs=RunStore(store),
        blobs=BlobStore(store, tmp_path / "blobs"),
        lease=engines.lease,
        remote=NoPeers(engines.registry),
    )


def asked(runner: DagRunner) -> list[Work]:
    assert isinstance(runner.remote, NoPeers)
    return runner.remote.asked


async def test_route_peer_on_a_call_fails_its_callee_like_an_llm_node_with_route_peer(
    routed: DagRunner,
) -> None:
    # an llm node with route: peer, where no peer is
    alone = {
        "type": "llm",
        "tag": "simple",
        "temperature": 0,
        "max_tokens": 6,
        "route": "peer",
        "prompt": "Describe a bell, plain.",
    }
    plain = routed.create(parse_dag(caller(first=alone)), {})
    plain_final = await routed.execute(plain.id)
    assert plain_final.status == "failed"
    expected = routed.runs.node(plain.id, "first").error
    assert expected == "node first: nowhere to run: local: route hint: peer only"

    # the same node in a callee that leaves route unset, called with route: peer
    run = routed.create(
        parse_dag(caller(call=call(hints={"route": "peer"}, thing="a bell"))), {}, inline()
    )
    final = await routed.execute(run.id)
    assert final.status == "failed"
    child = routed.runs.node(run.id, "call").child_run_id
    assert child is not None
    first = routed.runs.node(child, "first")
    assert first.status == "failed" and first.error == expected  # the same routing reason
    assert expected in (final.error or "") and DESCRIBE in (final.error or "")
    assert [(w.route, w.complexity) for w in asked(routed)] == [("peer", None)] * 2


async def test_route_local_on_a_call_keeps_its_callee_here_unless_a_node_says_otherwise(
    routed: DagRunner,
) -> None:
    run = routed.create(
        parse_dag(caller(call=call(False, {"route": "local"}, thing="a bell"))), {}, inline()
    )
    final = await routed.execute(run.id)
    assert final.status == "succeeded", final.error
    child = routed.runs.node(run.id, "call").child_run_id
    assert child is not None
    assert {n.ran_on for n in routed.runs.nodes(child)} == {"local"}
    assert asked(routed) == []  # "here, no question": the policy was never asked

    # a callee node's own route: peer wins over the call's route: local
    run = routed.create(
        parse_dag(caller(call=call(False, {"route": "local"}, thing="a bell"))),
        {},
        inline(route="peer"),
    )
    assert (await routed.execute(run.id)).status == "failed"
    assert [w.route for w in asked(routed)] == ["peer"]


async def test_complexity_on_a_call_reaches_the_routing_of_its_callees_nodes(
    routed: DagRunner,
) -> None:
    high = call(hints={"complexity": "high"}, thing="a bell")
    run = routed.create(parse_dag(caller(call=high)), {}, inline())
    final = await routed.execute(run.id)
    assert final.status == "succeeded", final.error
    assert [(w.route, w.complexity) for w in asked(routed)] == [("auto", "high")] * 2
    child = routed.runs.node(run.id, "call").child_run_id
    assert child is not None
    for node in routed.runs.nodes(child):  # no peer: local decided, with its reason
        assert node.ran_on == "local" and node.routing["ran_on"] == "local"
        assert node.routing["reason"].startswith("local: ")
    # a callee node's own complexity wins
    asked(routed).clear()
    run = routed.create(parse_dag(caller(call=high)), {}, inline(complexity="low", cache=False))
    assert (await routed.execute(run.id)).status == "succeeded"
    assert [w.complexity for w in asked(routed)] == ["low", "low"]


async def test_hints_that_move_a_call_are_part_of_its_cache_key(routed: DagRunner) -> None:
    """A peer may resolve a tag to another model: a call kept here must not be answered
    with what one sent to a peer computed, and the other way round."""

    async def run_call(hints: dict[str, str] | None) -> bool:
        record = routed.create(
            parse_dag(caller(call=call(hints=hints, thing="a drum"))), {}, inline()
        )
        assert (await routed.execute(record.id)).status == "succeeded"
        return bool(routed.runs.node(record.id, "call").cache_hit)

    assert not await run_call({"complexity": "high"})
    assert not await run_call(None)  # another key
    assert not await run_call({"route": "local"})  # another key
    assert await run_call({"complexity": "high"})  # the same hints: the same key
    assert await run_call(None)  # no hints: the document, so the key, of before


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)
