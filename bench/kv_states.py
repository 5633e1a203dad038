"""``bench.kv``'s in-process parts: states kept as KV chunks against whole states, in the
same run (see ``bench.kv``'s docstring for what each measures and its goal)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.dag import CountingBlobStore, context_text
from bench.engine import independent_runs, long_prompt, ours_fork, reference
from pcrt.cache.blobs import BlobStore
from pcrt.cache.chunks import Chunk, ChunkStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.engine import Engine, GenerateRequest
from pcrt.runtime.engine.chunk_cache import Hit
from pcrt.runtime.engine.kv_chunks import parse
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths

__all__ = ["checkpoints", "fork", "fork_time", "restore_rate"]

GiB = 1024**3


def _registry(home: Path) -> Registry:
    models = Paths.from_env().models_dir  # the model pulled once
    return Registry.load(Paths(home=home, models_dir=models, user_models_file=home / "m.toml"))


def checkpoint_dag(text: str) -> dict[str, Any]:
    return {
        "dag": "/dynamic/bench-checkpoints",
        "nodes": {
            "context": {"type": "llm", "prompt": text, "temperature": 0, "max_tokens": 8},
            "write": {
                "type": "llm",
                "context": "context",
                "prompt": "Repeat the text above word for word.",
                "temperature": 0,
                "max_tokens": 512,
                "checkpoint_every": 64,
                "cache": False,
            },
        },
    }


async def _written_by_write(threads: int, chunked: bool) -> dict[str, Any]:
    """A 512-token node after a ~1,000-token context, a checkpoint every 64 tokens: the
    bytes of states and chunks written while it ran (its parent's come before)."""
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-kv-ckpt-") as tmp:
        home = Path(tmp)
        store = Store(home / "pcrt.db")
        chunks = ChunkStore(store, home / "chunks", ram_bytes=GiB, disk_bytes=10 * GiB)
        options: dict[str, Any] = {"chunks": chunks} if chunked else {}
        registry = _registry(home)
        engines = LocalEngines(registry, parallel=2, context=2048, n_threads=threads, **options)
        blobs = CountingBlobStore(store, home / "blobs")
        blobs.written = []
        runs = RunStore(store)
        runner = DagRunner(registry=registry, runs=runs, blobs=blobs, lease=engines.lease)
        try:
            async with engines.lease(registry.resolve(None).name) as engine:
                text = context_text(engine, 1000)
            before: dict[str, int] = {}

            def on_event(event: DagEvent) -> None:
                if event.kind == "node_started" and event.node == "write":
                    chunks.flush()
                    before["blobs"] = sum(blobs.written)
                    before["chunks"] = chunks.stats().disk_bytes

            run = runner.create(parse_dag(checkpoint_dag(text)), {})
            record = await runner.execute(run.id, on_event)
            assert record.status == "succeeded", record.error
            chunks.flush()
            node = runner.runs.node(run.id, "write")
            blob_bytes = sum(blobs.written) - before["blobs"]
            chunk_bytes = chunks.stats().disk_bytes - before["chunks"]
            return {
                "context_tokens": node.prompt_tokens,
                "generated_tokens": node.completion_tokens,
                "checkpoints": len(blobs.written) - 2,  # all but the two final states
                "blob_bytes": blob_bytes,
                "chunk_bytes": chunk_bytes,
                "written": blob_bytes + chunk_bytes,
            }
        finally:
            engines.close()
            chunks.close()
            store.close()


async def checkpoints(threads: int, kv_per_token: int) -> dict[str, Any]:
    chunked = await _written_by_write(threads, chunked=True)
    whole = await _written_by_write(threads, chunked=False)
    own = chunked["generated_tokens"] * kv_per_token
    return {
        "chunked": chunked,
        "whole": whole,
        "own_kv_bytes": own,
        "ratio": chunked["written"] / own,
        "whole_ratio": whole["written"] / own,
        "goal": "<= 1.2",
    }


async def fork(engine: Engine, chunks: ChunkStore) -> dict[str, Any]:
    """4 branches of 64 tokens over a 1,000-token context, each branch's state exported:
    the bytes they take as chunked states (every chunk they name, once, and their
    blobs) against one branch's whole state."""
    cache = engine.chunk_cache
    assert cache is not None
    prompt = long_prompt(engine, 1000)
    no_eos = {engine.model.eos_id: -1e9}
    sampling = SamplingParams(temperature=0.8, seed=7, max_tokens=64, logit_bias=no_eos)
    await engine.clear_cache()
    result = await engine.generate(
        GenerateRequest(prompt=prompt, sampling=sampling, n=4, export_state=True)
    )
    states = [c.state for c in result.choices if c.state is not None]
    assert len(states) == 4
    kept = [await asyncio.to_thread(cache.chunked, s) for s in states]
    chunks.flush()
    # every chunk the four name, once, and their blobs (keys and tails)
    sizes = {k: len(chunks.read([k])[0]) for state in kept for k in state.chunks}
    stored = sum(sizes.values()) + sum(len(state.to_bytes()) for state in kept)
    one = len(states[0].to_bytes())
    return {
        "branch_tokens": [len(s.tokens) for s in states],
        "chunks": len(sizes),
        "stored_bytes": stored,
        "one_branch_bytes": one,
        "bytes_ratio": stored / one,
        "whole_bytes": sum(len(s.to_bytes()) for s in states),
        "bytes_goal": "<= 1.3",
    }


async def fork_time(engine: Engine, threads: int, repeats: int) -> dict[str, Any]:
    """bench.engine's fork row (4 x 64 over 500 tokens, over 4 independent runs), on an
    engine without a chunk store (its independent runs must compute their prompts),
    against llama.cpp's own fork in its own process."""
    short = long_prompt(engine, 500)
    fork_t = [await ours_fork(engine, short, 4, 64) for _ in range(repeats)]
    indep_t = [await independent_runs(engine, short, 4, 64) for _ in range(repeats)]
    floors = [reference("fork", Path(engine.model.path), threads)[0] for _ in range(repeats)]
    ours = min(fork_t) / min(indep_t)
    return {
        "fork_s": min(fork_t),
        "independent_s": min(indep_t),
        "fork_ratio": ours,
        "llama_cpp_fork_ratio": min(floors),
        "time_ratio": ours / min(floors),
        "time_goal": "<= 1.05",
    }


async def restore_rate(engine: Engine, chunks: ChunkStore, home: Path) -> dict[str, Any]:
    """1,000 tokens back into a slot: from chunks (the RAM tier; the disk tier, read and
    checked) against a whole state's blob (mapped, checked, imported): tokens/s."""
    cache = engine.chunk_cache
    assert cache is not None
    prompt = long_prompt(engine, 1001)
    await engine.clear_cache()
    sampling = SamplingParams(temperature=0, max_tokens=1)
    result = await engine.generate(
        GenerateRequest(prompt=prompt, sampling=sampling, export_state=True)
    )
    state = result.choices[0].state
    assert state is not None
    n = len(state.tokens)
    kv_per_token = parse(state.payload).bytes_per_token
    store = Store(home / "restore.db")
    blobs = BlobStore(store, home / "restore-blobs")
    sha = blobs.put(state.to_bytes())
    kept = cache.chunked(state, keep_tail=False)
    keys = list(kept.chunks)
    c = cache.chunk_tokens
    scheduler = engine._scheduler  # the restore itself runs where the engine runs it
    slot = scheduler.slots[0]

    def whole_blob() -> None:
        loaded = KVState.from_bytes(blobs.map(sha), verify=False, in_place=True)
        scheduler._kv.restore(slot, loaded)

    def from_chunks(data: list[Chunk]) -> None:
        hit = Hit(keys, None, 0, True)
        joined = cache.state_of(prompt, hit, data)
        assert joined is not None and len(joined.tokens) == len(keys) * c
        scheduler._kv.restore(slot, joined)

    def timed(fn: Any, *args: Any) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - start)
        return best

    ram = chunks.take_from_ram(keys)
    assert len(ram) == len(keys) and all(parse(d).n_tokens == c for d in ram)
    t_whole = await engine.call(lambda: timed(whole_blob))
    t_ram = await engine.call(lambda: timed(from_chunks, ram))

    # the same disk tier as a new process sees it: no RAM tier
    disk = ChunkStore(chunks._store, chunks._root, ram_bytes=0, disk_bytes=chunks.disk_limit)

    def read_disk() -> tuple[float, list[Chunk]]:
        start = time.perf_counter()
        found = disk.read(keys)  # mapped and checked
        assert len(found) == len(keys)
        return time.perf_counter() - start, found

    reads = [await asyncio.to_thread(read_disk) for _ in range(5)]
    disk.close()
    t_read = min(seconds for seconds, _ in reads)
    t_join = await engine.call(lambda: timed(from_chunks, reads[0][1]))
    await engine.clear_cache()
    store.close()
    whole_rate = n / t_whole
    chunk_tokens = len(keys) * c
    return {
        "tokens": n,
        "kv_per_token": kv_per_token,
        "chunk_tokens": chunk_tokens,
        "whole_blob_s": t_whole,
        "ram_chunks_s": t_ram,
        "disk_chunks_s": t_read + t_join,
        "whole_tok_s": whole_rate,
        "ram_tok_s": chunk_tokens / t_ram,
        "disk_tok_s": chunk_tokens / (t_read + t_join),
        "ratio": chunk_tokens / t_ram / whole_rate,
        "disk_ratio": chunk_tokens / (t_read + t_join) / whole_rate,
        "goal": ">= 0.8",
    }
