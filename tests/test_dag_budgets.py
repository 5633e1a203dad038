"""DAG budgets at run time, on the real default model: ``max_tokens``, ``timeout_sec`` and
``max_nodes`` (with subgraph calls at exactly the validated bound), and what a budget stop
keeps (finished outputs, the cut node's checkpoints)."""

from __future__ import annotations

from typing import Any

import pytest

from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.errors import DagInvalid
from tests.test_dag_run import conversation_dag, long_dag
from tests.test_dag_subgraph import DESCRIBE, call, caller, inline


async def test_max_nodes_at_the_validated_bound_never_stops_a_run_with_calls(
    runner: DagRunner,
) -> None:
    """Validation counts a call as its callee's nodes; the run counts each call as its
    child run's executions and gives each child what the caller has left. Two calls in a
    row (2 + 2 nodes) and an assert are 5: at max_nodes 5 the run finishes (the second
    child gets exactly the 3 left, and needs 2), at 4 it is refused before it starts. So no
    DAG that validation passes can be stopped by max_nodes at run time."""
    doc: dict[str, Any] = caller(
        lamp=call(False, thing="a lamp"),
        cup=call(False, thing="{{ nodes.lamp.output.second }}"),
        check={"type": "assert", "that": "nodes.cup.output.summary | length > 0"},
    )
    with pytest.raises(DagInvalid, match="max_nodes"):
        runner.create(parse_dag({**doc, "budget": {"max_nodes": 4}}), {}, inline(cache=False))
    run = runner.create(parse_dag({**doc, "budget": {"max_nodes": 5}}), {}, inline(cache=False))
    final = await runner.execute(run.id)
    assert final.status == "succeeded", final.error
    assert final.nodes_executed == 5
    second = runner.runs.get_run(runner.runs.node(run.id, "cup").child_run_id or "")
    assert second.dag_path == DESCRIBE
    assert parse_dag(second.spec).budget.max_nodes == 3  # 5, less the first call's 2
    assert second.nodes_executed == 2


async def test_a_max_tokens_stop_keeps_outputs_and_the_cut_nodes_checkpoints(
    runner: DagRunner,
) -> None:
    """The budget runs out inside ``story``: it is cut at what was left, its checkpoints
    (every 4 tokens) stay on its record with their blobs, ``intro``'s output stays, and
    ``after`` never starts."""
    run = runner.create(long_dag({"max_tokens": 40}), {})
    final = await runner.execute(run.id)
    assert final.status == "budget_exceeded" and "max_tokens" in (final.error or ""), final
    assert final.tokens_used == 40
    nodes = {n.node_id: n for n in runner.runs.nodes(run.id)}
    intro, story = nodes["intro"], nodes["story"]
    assert intro.status == "succeeded" and isinstance(intro.output, str) and intro.output
    assert story.completion_tokens == 40 - (intro.completion_tokens or 0)
    assert story.checkpoint_sha256 is not None and story.checkpoint_tokens is not None
    assert 4 <= story.checkpoint_tokens <= story.completion_tokens
    assert story.checkpoint_tokens % 4 == 0
    assert runner.blobs.get(story.checkpoint_sha256)  # the checkpoint's state is kept
    assert nodes["after"].status == "pending" and nodes["after"].output is None
    # each new checkpoint replaced the one before (8 were taken): the run's blobs are
    # the ones its records point at, not every checkpoint ever written
    pointed = {sha for n in nodes.values() for sha in (n.state_sha256, n.checkpoint_sha256)}
    assert {b.sha256 for b in runner.blobs.entries(run.id)} == pointed - {None}


async def test_a_timeout_stop_keeps_the_in_flight_nodes_checkpoint(runner: DagRunner) -> None:
    """timeout_sec ends the run while ``story`` generates: the run says budget_exceeded,
    ``intro``'s output stays, and ``story``'s latest checkpoint stays on its record."""
    warm = runner.create(long_dag({}, then=False, story_tokens=4), {})
    assert (await runner.execute(warm.id)).status == "succeeded"  # the model is loaded
    run = runner.create(long_dag({"timeout_sec": 3}, then=False, story_tokens=2000), {})
    final = await runner.execute(run.id)
    assert final.status == "budget_exceeded" and "timeout_sec" in (final.error or ""), final
    nodes = {n.node_id: n for n in runner.runs.nodes(run.id)}
    assert nodes["intro"].status == "succeeded" and nodes["intro"].output
    story = nodes["story"]
    assert story.status != "succeeded" and story.output is None
    assert story.checkpoint_sha256 is not None and (story.checkpoint_tokens or 0) >= 4
    assert runner.blobs.get(story.checkpoint_sha256)


async def test_a_last_node_cut_by_max_tokens_is_a_budget_stop(runner: DagRunner) -> None:
    """The same cut in the run's last node: the output is short of what the node asked
    for because of the budget, so the run must not say it succeeded."""
    run = runner.create(long_dag({"max_tokens": 40}, then=False), {})
    final = await runner.execute(run.id)
    story = runner.runs.node(run.id, "story")
    assert final.tokens_used == 40 and story.completion_tokens == 40 - (
        runner.runs.node(run.id, "intro").completion_tokens or 0
    )
    assert final.status == "budget_exceeded", (final.status, final.error)


async def test_a_fork_cut_by_max_tokens_shares_the_budget_and_stops_the_run(
    runner: DagRunner,
) -> None:
    """A fork of 3 samples as the run's last node, with 30 tokens left: the samples share
    them (10 each, not 30 each), and the cut stops the run as budget_exceeded."""
    doc = {
        "dag": "/dynamic/forked",
        "budget": {"max_tokens": 30},
        "nodes": {
            "ideas": {
                "type": "fork",
                "samples": 3,
                "temperature": 0.8,
                "seed": 3,
                "max_tokens": 64,
                "cache": False,
                "prompt": "Count from 1 to 100, one number per line.",
            },
        },
    }
    final = await runner.execute(runner.create(parse_dag(doc), {}).id)
    assert final.status == "budget_exceeded" and "max_tokens" in (final.error or ""), final
    assert final.tokens_used <= 30
    ideas = runner.runs.node(final.id, "ideas")
    assert ideas.status == "succeeded" and len(ideas.output) == 3  # the cut outputs stay


async def test_budgets_stop_the_run_and_keep_outputs(runner: DagRunner) -> None:
    doc = conversation_dag(cache=False)
    doc["budget"] = {"max_tokens": 10}  # the first answer alone needs more
    run = runner.create(parse_dag({**doc, "nodes": {**doc["nodes"]}}), {})
    final = await runner.execute(run.id)
    assert final.status == "budget_exceeded" and "max_tokens" in (final.error or "")
    assert runner.runs.node(run.id, "first").status == "succeeded"  # kept
    timed = dict(conversation_dag(cache=False), budget={"timeout_sec": 0.05})
    timed["nodes"]["first"] = {**timed["nodes"]["first"], "max_tokens": 500, "cache": False}
    final = await runner.execute(runner.create(parse_dag(timed), {}).id)
    assert final.status == "budget_exceeded" and "timeout" in (final.error or "")
    nodes = dict(conversation_dag(), budget={"max_nodes": 1})
    with pytest.raises(DagInvalid, match="max_nodes"):
        runner.create(parse_dag(nodes), {})
