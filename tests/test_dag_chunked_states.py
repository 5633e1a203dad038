"""DAG states kept as KV chunks (issue 19), on the real default model: a node's state is
a blob of kilobytes naming chunks that a ``context`` child restores; checkpoints write
each chunk once and no tail (they fall on chunk boundaries), and a resume from one
computes nothing again; a run's chunks are pinned until it finishes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pcrt.cache.blobs import BlobStore
from pcrt.cache.chunks import ChunkStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.engine.state import ChunkedState, KVState, is_chunked_blob
from pcrt.runtime.models.registry import Registry
from tests.homes import isolated_paths

C = 64
KV_PER_TOKEN = 23_040  # SmolLM2-135M, f16 K and V: 30 layers x (384 + 384) bytes
BRIEF = "You are a careful assistant for a lighthouse keeper. " * 20


@pytest.fixture
async def setup(
    default_model_path: Path, tmp_path: Path
) -> AsyncIterator[tuple[DagRunner, LocalEngines, ChunkStore]]:
    store = Store(tmp_path / "pcrt.db")
    chunks = ChunkStore(store, tmp_path / "chunks", ram_bytes=1 << 30, disk_bytes=1 << 32)
    registry = Registry.load(isolated_paths(tmp_path / "home"))
    engines = LocalEngines(registry, parallel=2, context=1024, n_threads=2, chunks=chunks)
    runner = DagRunner(
        registry=registry,
        runs=RunStore(store),
        blobs=BlobStore(store, tmp_path / "blobs"),
        lease=engines.lease,
    )
    yield runner, engines, chunks
    engines.close()
    chunks.close()
    store.close()


def forget_ram(chunks: ChunkStore) -> None:
    """The RAM tier emptied, as a new process finds it: what is read comes from disk."""
    with chunks._lock:
        chunks._ram.clear()
        chunks._ram_size = 0


def dag(**essay: Any) -> Any:
    return parse_dag(
        {
            "dag": "/dynamic/chunked",
            "nodes": {
                "brief": {
                    "type": "llm",
                    "prompt": BRIEF + "Say hello.",
                    "temperature": 0,
                    "max_tokens": 8,
                    "cache": False,
                },
                "essay": {
                    "type": "llm",
                    "context": "brief",
                    "prompt": "Now write a long essay about the sea.",
                    "temperature": 0,
                    "max_tokens": 160,
                    "cache": False,
                    **essay,
                },
            },
        }
    )


async def test_a_child_continues_its_parents_state_from_chunks(
    setup: tuple[DagRunner, LocalEngines, ChunkStore],
) -> None:
    runner, engines, chunks = setup
    run = runner.create(dag(max_tokens=16), {})
    assert (await runner.execute(run.id)).status == "succeeded"
    brief, essay = runner.runs.nodes(run.id)
    blob = runner.blobs.get(brief.state_sha256 or "")
    assert is_chunked_blob(blob)
    kept = ChunkedState.from_bytes(blob)
    assert len(kept.chunks) >= 3 and 0 < kept.tail_tokens < C
    assert len(blob) < (kept.tail_tokens + 20) * KV_PER_TOKEN  # the tail and a header
    # the whole parent came back from its chunks and tail: only the new turn computed
    assert essay.cached_tokens == len(kept.tokens)
    # with no slot and no RAM holding it, from the disk
    await engines.clear_caches()
    forget_ram(chunks)
    runner.runs.patch_node(run.id, "essay", status="pending")
    runner.runs.set_status(run.id, "interrupted")
    await runner.execute(run.id)
    redo = runner.runs.node(run.id, "essay")
    assert redo.cached_tokens == len(kept.tokens) and redo.output == essay.output


async def test_checkpoints_write_each_chunk_once_and_a_resume_computes_nothing_again(
    setup: tuple[DagRunner, LocalEngines, ChunkStore],
) -> None:
    runner, engines, chunks = setup
    whole = runner.create(dag(checkpoint_every=16), {})
    await runner.execute(whole.id)
    expected = runner.runs.node(whole.id, "essay")
    chunks.flush()
    written = chunks.stats().disk_bytes
    tokens = expected.prompt_tokens + expected.completion_tokens
    # every chunk of the sequence once (the brief's shared), though ten checkpoints
    # each named all of them; whole states would have written every checkpoint whole
    assert written <= tokens * KV_PER_TOKEN
    assert written >= (tokens // C) * C * KV_PER_TOKEN * 0.99

    await engines.clear_caches()
    run = runner.create(dag(checkpoint_every=16), {})
    seen = asyncio.Event()
    checkpoints: list[int] = []

    def on_event(event: DagEvent) -> None:
        if event.kind == "checkpoint":
            checkpoints.append(event.data["tokens"])
            if len(checkpoints) == 2:
                seen.set()

    task = asyncio.create_task(runner.execute(run.id, on_event))
    await asyncio.wait_for(seen.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    node = runner.runs.node(run.id, "essay")
    kept = ChunkedState.from_bytes(runner.blobs.get(node.checkpoint_sha256 or ""))
    # every 16 tokens at least, each on a chunk boundary: whole chunks, no tail
    assert checkpoints[1] - checkpoints[0] == C and len(kept.tokens) % C == 0
    assert kept.tail_tokens == 0 and len(runner.blobs.get(node.checkpoint_sha256 or "")) < 20_000
    assert chunks.stats().pinned >= len(kept.chunks)  # the unfinished run holds them
    chunks.clear()  # keeps what the unfinished run needs
    assert len(chunks.read(kept.chunks)) == len(kept.chunks)

    await engines.clear_caches()
    final = await runner.execute(run.id)
    assert final.status == "succeeded"
    resumed = runner.runs.node(run.id, "essay")
    assert resumed.resumed_from_checkpoint
    # the chunks came back, all the KV there was: the resume computed nothing again, and
    # continues exactly as the uninterrupted run did
    assert resumed.cached_tokens == len(kept.chunks) * C == len(kept.tokens)
    assert resumed.completion_tokens == expected.completion_tokens
    assert resumed.output == expected.output
    # finished: its chunks are the store's to evict again
    chunks.clear()
    assert chunks.stats().pinned == 0


async def test_a_state_whose_chunks_were_evicted_comes_back_in_part(
    setup: tuple[DagRunner, LocalEngines, ChunkStore],
) -> None:
    runner, engines, chunks = setup
    run = runner.create(dag(max_tokens=8), {})
    await runner.execute(run.id)
    brief = runner.runs.node(run.id, "brief")
    kept = ChunkedState.from_bytes(runner.blobs.get(brief.state_sha256 or ""))
    engine = next(iter(engines._engines.values()))
    assert engine.chunk_cache is not None
    # its third chunk gone (another process evicted it): the first two come back
    assert chunks._root is not None
    (chunks._root / kept.chunks[2][:2] / kept.chunks[2]).unlink()
    forget_ram(chunks)
    state, rest = engine.chunk_cache.whole(kept)
    assert isinstance(state, KVState) and len(state.tokens) == 2 * C
    assert state.next_token is None and rest == kept.tokens[2 * C :] + [kept.next_token]
