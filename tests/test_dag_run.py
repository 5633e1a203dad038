"""Running DAGs in-process on the real default model: records, states, resume, budgets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pcrt.runtime.dag import load_dag, parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.errors import DagInvalid

EXAMPLES = Path(__file__).parent.parent / "examples" / "dags"


def conversation_dag(**child: object) -> dict:
    return {
        "dag": "/dynamic/chat",
        "nodes": {
            "first": {
                "type": "llm",
                "tag": "simple",
                "prompt": "Name three fruits.",
                "temperature": 0,
                "max_tokens": 24,
            },
            "second": {
                "type": "llm",
                "tag": "simple",
                "context": "first",
                "prompt": "Which of them is the sweetest?",
                "temperature": 0,
                "max_tokens": 24,
                **child,
            },
        },
    }


async def test_example_dag_runs_and_records_everything(runner: DagRunner) -> None:
    events: list[DagEvent] = []
    run = runner.create(load_dag(EXAMPLES / "summary_titles.yaml"), {})
    final = await runner.execute(run.id, events.append)
    assert final.status == "succeeded", final.error
    nodes = {n.node_id: n for n in runner.runs.nodes(run.id)}
    assert isinstance(nodes["summary"].output, str) and nodes["summary"].output
    assert len(nodes["titles"].output) == 3 and nodes["check"].output is True
    summary = nodes["summary"]
    assert summary.state_sha256 is not None and summary.ran_on == "local"
    state = KVState.from_bytes(runner.blobs.get(summary.state_sha256))
    # prompt and output are in the KV; the pending token is the end token or the last one
    produced = summary.prompt_tokens + summary.completion_tokens
    assert produced in (len(state.tokens), len(state.tokens) + 1)
    kinds = [e.kind for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("node_finished") == 3 and "token" in kinds
    assert final.nodes_executed == 3 and final.tokens_used > 0


async def test_context_continues_the_parents_kv(runner: DagRunner, engines: LocalEngines) -> None:
    run = runner.create(parse_dag(conversation_dag(cache=False)), {})
    assert (await runner.execute(run.id)).status == "succeeded"
    first, second = runner.runs.nodes(run.id)
    parent_state = KVState.from_bytes(runner.blobs.get(first.state_sha256))
    # the whole parent context came back from its state: only the new turn was computed
    assert second.cached_tokens == len(parent_state.tokens)
    # and it answers as recomputing the whole conversation does
    await engines.clear_caches()
    runner.runs.patch_node(run.id, "first", state_sha256=None)
    runner.runs.patch_node(run.id, "second", status="pending")
    runner.runs.set_status(run.id, "interrupted")
    await runner.execute(run.id)
    redo = runner.runs.node(run.id, "second")
    assert redo.cached_tokens == 0 and redo.output == second.output


async def test_corrupt_and_foreign_states_are_refused_then_recomputed(
    runner: DagRunner, engines: LocalEngines
) -> None:
    run = runner.create(parse_dag(conversation_dag(cache=False)), {})
    await runner.execute(run.id)
    first, second = runner.runs.nodes(run.id)
    path = runner.blobs.path_of(first.state_sha256)
    for damage in ("corrupt", "foreign"):
        if damage == "corrupt":
            data = bytearray(path.read_bytes())
            data[-5] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            state = KVState.from_bytes(
                runner.blobs.get(runner.blobs.put(_fresh_state_bytes(runner, run.id)))
            )
            foreign = KVState(
                state.key.model_copy(update={"model_sha256": "f" * 64}),
                state.tokens,
                state.next_token,
                state.payload,
            )
            runner.runs.patch_node(
                run.id, "first", state_sha256=runner.blobs.put(foreign.to_bytes())
            )
        runner.runs.patch_node(run.id, "second", status="pending")
        runner.runs.set_status(run.id, "interrupted")
        await engines.clear_caches()  # no slot may still hold the parent's tokens
        again = await runner.execute(run.id)
        assert again.status == "succeeded"
        redo = runner.runs.node(run.id, "second")
        assert redo.output == second.output  # slower, never wrong
        assert redo.cached_tokens == 0


def _fresh_state_bytes(runner: DagRunner, run_id: str) -> bytes:
    sha = runner.runs.node(run_id, "second").state_sha256
    assert sha is not None
    return runner.blobs.get(sha)


async def test_resume_continues_from_the_checkpoint(
    runner: DagRunner, engines: LocalEngines
) -> None:
    doc = {
        "dag": "/dynamic/long",
        "nodes": {
            "essay": {
                "type": "llm",
                "tag": "simple",
                "prompt": "Write a long essay about the sea.",
                "temperature": 0,
                "max_tokens": 96,
                "checkpoint_every": 32,
                "cache": False,
            }
        },
    }
    # the reference: uninterrupted. Both runs prefill cold: a prompt whose prefix comes
    # from the slot cache decodes its last token alone, and that other batch shape can
    # flip a greedy near-tie (llama.cpp's numerics, not a resume effect)
    await engines.clear_caches()
    whole = runner.create(parse_dag(doc), {})
    await runner.execute(whole.id)
    expected = runner.runs.node(whole.id, "essay").output
    # interrupted after its second checkpoint
    await engines.clear_caches()
    run = runner.create(parse_dag(doc), {})
    seen = asyncio.Event()

    def on_event(event: DagEvent) -> None:
        if event.kind == "checkpoint" and event.data["tokens"] == 64:
            seen.set()

    task = asyncio.create_task(runner.execute(run.id, on_event))
    await asyncio.wait_for(seen.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    node = runner.runs.node(run.id, "essay")
    assert runner.runs.get_run(run.id).status == "cancelled"
    assert node.checkpoint_tokens == 64 and node.status == "running"
    final = await runner.execute(run.id)
    assert final.status == "succeeded"
    node = runner.runs.node(run.id, "essay")
    assert node.resumed_from_checkpoint
    assert node.cached_tokens >= node.prompt_tokens + 63  # nothing recomputed
    assert node.output == expected


async def test_cache_hit_and_miss(runner: DagRunner) -> None:
    doc = conversation_dag()
    first = runner.create(parse_dag(doc), {})
    await runner.execute(first.id)
    again = runner.create(parse_dag(doc), {})
    await runner.execute(again.id)
    assert [n.cache_hit for n in runner.runs.nodes(again.id)] == [True, True]
    sampled = runner.create(parse_dag(conversation_dag(temperature=0.9)), {})
    await runner.execute(sampled.id)  # no seed, not deterministic: never cached
    assert not runner.runs.node(sampled.id, "second").cache_hit


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


async def test_assert_false_fails_with_the_expression(runner: DagRunner) -> None:
    doc = {
        "dag": "/dynamic/check",
        "inputs": {"n": {"type": "integer", "default": 3}},
        "nodes": {"check": {"type": "assert", "that": "inputs.n > 5"}},
    }
    final = await runner.execute(runner.create(parse_dag(doc), {}).id)
    assert final.status == "failed" and "inputs.n > 5" in (final.error or "")
    ok = await runner.execute(runner.create(parse_dag(doc), {"n": 9}).id)
    assert ok.status == "succeeded"
