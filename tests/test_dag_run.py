"""Running DAGs in-process on the real default model: records, states (refused when corrupt
or foreign, and a disk that refuses them), resume, the cache, asserts. (Budgets:
``test_dag_budgets.py``.)"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.runtime.dag import load_dag, parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.engine.state import KVState

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


def long_dag(budget: dict[str, Any], *, then: bool = True, story_tokens: int = 200) -> Any:
    nodes: dict[str, Any] = {
        "intro": {
            "type": "llm",
            "prompt": "Describe a lighthouse in one sentence.",
            "temperature": 0,
            "max_tokens": 8,
            "cache": False,
        },
        "story": {
            "type": "llm",
            "context": "intro",
            "prompt": "Now count from 1 to 200, one number per line.",
            "temperature": 0,
            "max_tokens": story_tokens,
            "checkpoint_every": 4,
            "cache": False,
        },
    }
    if then:
        nodes["after"] = {
            "type": "llm",
            "prompt": "Sum up: {{ nodes.story.output }}",
            "temperature": 0,
            "max_tokens": 4,
            "cache": False,
        }
    return parse_dag({"dag": "/dynamic/long", "nodes": nodes, "budget": budget})


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
    # stopped mid-way: interrupted (not left "running"), its checkpoint kept
    assert node.checkpoint_tokens == 64 and node.status == "interrupted"
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


class FullDiskBlobs(BlobStore):
    """A blob store on a full disk: each write fails as the OS fails it (a full disk
    cannot be made here without root mounts)."""

    def put(self, data: bytes, *, kind: str = "kv-state", run_id: str | None = None) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def test_a_disk_that_refuses_states_costs_the_run_nothing_but_its_states(
    engines: LocalEngines, store: Store, tmp_path: Path
) -> None:
    """States are insurance: when the disk refuses them (full; the write fails as the OS
    fails it), every node still finishes, with no state or checkpoint on its record, and
    ``story`` continues ``intro``'s conversation by recomputing it."""
    runner = DagRunner(
        registry=engines.registry,
        runs=RunStore(store),
        blobs=FullDiskBlobs(store, tmp_path / "blobs"),
        lease=engines.lease,
    )
    run = runner.create(long_dag({}, story_tokens=12), {})
    final = await runner.execute(run.id)
    assert final.status == "succeeded", final.error
    nodes = runner.runs.nodes(run.id)
    assert all(n.status == "succeeded" and n.output for n in nodes)
    assert all(n.state_sha256 is None and n.checkpoint_sha256 is None for n in nodes)


def keywords_dag(max_tokens: int, **bounds: int) -> Any:
    """A keyword-list node, the kind that used to fail on an unfinished string."""
    item: dict[str, Any] = {"type": "string"}
    if "max_length" in bounds:
        item["maxLength"] = bounds["max_length"]
    keywords: dict[str, Any] = {"type": "array", "items": item}
    if "max_items" in bounds:
        keywords["maxItems"] = bounds["max_items"]
    node = {
        "type": "llm",
        "prompt": "Give keywords for an article about baking bread.",
        "temperature": 0,
        "max_tokens": max_tokens,
        "output_schema": {
            "type": "object",
            "properties": {"keywords": keywords},
            "required": ["keywords"],
        },
    }
    return parse_dag({"dag": "/dynamic/keywords", "nodes": {"keywords": node}})


async def test_a_schema_node_cut_by_max_tokens_says_how_to_make_room(runner: DagRunner) -> None:
    final = await runner.execute(runner.create(keywords_dag(12), {}).id)
    assert final.status == "failed"
    assert "max_tokens ran out before the JSON" in (final.error or "")
    assert "maxItems" in (final.error or "") and "maxLength" in (final.error or "")
    bounded = keywords_dag(64, max_items=3, max_length=12)
    ok = await runner.execute(runner.create(bounded, {}).id)
    assert ok.status == "succeeded", ok.error
    output = runner.runs.node(ok.id, "keywords").output
    assert isinstance(output["keywords"], list) and len(output["keywords"]) <= 3
    assert all(isinstance(k, str) and len(k) <= 12 for k in output["keywords"])
