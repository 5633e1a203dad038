"""DAG benchmarks against references measured in the same run.

    python -m bench.dag [--threads 2] [--repeats 2] [--out bench/results/dag.json]

1. resume cost: a node continuing a 2,000-token context, time to its first token with
   the parent's KV restored vs with no saved state (the context recomputed); and the
   parent's blob bytes vs llama.cpp's own sequence-state size;
2. a DAG of one 300-token shared context, a fork of 4 samples and 3 dependent nodes,
   wall time vs the same prompts run one after another through llama-cpp-python's
   high-level ``Llama`` (which reuses its own single cached prefix where it can);
3. checkpoint disk: the state bytes a long node (after a 1,000-token context, 512
   tokens, a checkpoint every 64) leaves on disk vs the bytes its checkpoints wrote,
   which is what stayed before a new checkpoint replaced the previous one.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import run_benchmark
from bench.engine_reference import QUESTIONS
from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.status import RunStatus
from pcrt.cache.store import Store
from pcrt.device.units import format_bytes
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.engine import Engine
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths

FILLER = (
    "The committee met on Tuesday to review the annual report. Members discussed the "
    "budget, the hiring plan, the new office, and the timeline for the product launch. "
)


def runner_for(registry: Registry, home: Path, engines: LocalEngines) -> DagRunner:
    store = Store(home / "pcrt.db")
    return DagRunner(
        registry=registry,
        runs=RunStore(store),
        blobs=BlobStore(store, home / "blobs"),
        lease=engines.lease,
    )


class CountingBlobStore(BlobStore):
    """The blob store, counting the bytes of every state written through it."""

    written: list[int]

    def put(self, data: bytes, *, kind: str = "kv-state", run_id: str | None = None) -> str:
        self.written.append(len(data))
        return super().put(data, kind=kind, run_id=run_id)


def context_text(engine: Engine, n_tokens: int) -> str:
    """Filler text of about ``n_tokens`` tokens for the model."""
    words = (FILLER * (n_tokens // 20 + 20)).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of words that stays within n_tokens
        mid = (lo + hi + 1) // 2
        if len(engine.model.tokenize(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


async def resume_cost(
    registry: Registry, engines: LocalEngines, engine: Engine, home: Path
) -> dict[str, Any]:
    text = context_text(engine, 2000)
    doc = {
        "dag": "/dynamic/resume",
        "inputs": {"text": {"type": "string"}},
        "nodes": {
            "read": {
                "type": "llm",
                "tag": "simple",
                "prompt": "{{ inputs.text }}",
                "temperature": 0,
                "max_tokens": 1,
                "cache": False,
            },
            "ask": {
                "type": "llm",
                "tag": "simple",
                "context": "read",
                "prompt": "Summarize.",
                "temperature": 0,
                "max_tokens": 8,
                "cache": False,
            },
        },
    }
    runner = runner_for(registry, home, engines)
    run = runner.create(parse_dag(doc), {"text": text})
    await engines.clear_caches()
    await runner.execute(run.id)
    read = runner.runs.node(run.id, "read")
    assert read.state_sha256 is not None
    blob_bytes = len(runner.blobs.get(read.state_sha256))

    async def first_token(keep_state: bool) -> tuple[float, int]:
        await engines.clear_caches()
        runner.runs.patch_node(run.id, "ask", status="pending")
        if not keep_state:
            runner.runs.patch_node(run.id, "read", state_sha256=None)
        runner.runs.set_status(run.id, RunStatus.INTERRUPTED)
        stamps: list[float] = []
        start = time.perf_counter()

        def on_event(event: DagEvent) -> None:
            if event.kind == "token" and event.node == "ask" and not stamps:
                stamps.append(time.perf_counter())

        await runner.execute(run.id, on_event)
        cached = runner.runs.node(run.id, "ask").cached_tokens or 0
        return stamps[0] - start, cached

    restored, cached_restored = await first_token(True)
    recomputed, cached_recomputed = await first_token(False)
    cells = engine.context_per_slot * engine.config.parallel
    llama_bytes = engine.kv_bytes // cells * (read.prompt_tokens or 0)  # KV of its tokens
    return {
        "context_tokens": read.prompt_tokens,
        "first_token_restored_s": restored,
        "first_token_recomputed_s": recomputed,
        "ratio": restored / recomputed,
        "cached_tokens_restored": cached_restored,
        "cached_tokens_recomputed": cached_recomputed,
        "blob_bytes": blob_bytes,
        "kv_bytes_estimate": llama_bytes,
        "goal": "ratio <= 1/50",
    }


async def checkpoint_disk(
    registry: Registry, engines: LocalEngines, engine: Engine, home: Path
) -> dict[str, Any]:
    doc = {
        "dag": "/dynamic/long",
        "inputs": {"text": {"type": "string"}},
        "nodes": {
            "write": {
                "type": "llm",
                "tag": "simple",
                "temperature": 0,
                "max_tokens": 512,
                "prompt": "{{ inputs.text }}\nNow count from 1 to 1000, one number per line.",
                "checkpoint_every": 64,
                "cache": False,
            }
        },
    }
    store = Store(home / "disk.db")
    blobs = CountingBlobStore(store, home / "disk-blobs")
    blobs.written = []
    runner = DagRunner(registry=registry, runs=RunStore(store), blobs=blobs, lease=engines.lease)
    run = runner.create(parse_dag(doc), {"text": context_text(engine, 1000)})
    record = await runner.execute(run.id)
    assert record.status == "succeeded", record.error
    node = runner.runs.node(run.id, "write")
    kept = sum(b.size for b in blobs.entries(run.id))
    store.close()
    return {
        "context_tokens": node.prompt_tokens,
        "generated_tokens": node.completion_tokens,
        "states_written": len(blobs.written),
        "bytes_written": sum(blobs.written),
        "bytes_kept": kept,
        "ratio": kept / sum(blobs.written),
    }


def shared_dag(text: str) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "brief": {
            "type": "llm",
            "tag": "simple",
            "prompt": f"Read this:\n{text}\nNoted?",
            "temperature": 0,
            "max_tokens": 32,
            "cache": False,
        },
        "ideas": {
            "type": "fork",
            "tag": "simple",
            "context": "brief",
            "samples": 4,
            "prompt": "Suggest one follow-up.",
            "temperature": 0.8,
            "seed": 7,
            "max_tokens": 32,
            "cache": False,
        },
    }
    for i, question in enumerate(QUESTIONS):
        nodes[f"q{i}"] = {
            "type": "llm",
            "tag": "simple",
            "context": "brief",
            "prompt": question,
            "temperature": 0,
            "max_tokens": 32,
            "cache": False,
        }
    return {"dag": "/dynamic/shared", "nodes": nodes}


def reference_sequential(path: Path, text: str, threads: int) -> float:
    """The same prompts through llama-cpp-python's Llama, in a process of its own (two
    llama.cpp contexts that both computed in one process slow each other down here)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.engine_reference", "dag", str(path), str(threads)],
        input=text,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.split()[0])


async def run(threads: int, repeats: int) -> dict[str, Any]:
    registry = Registry.load()
    entry = registry.resolve(None)
    path = ensure_pulled(entry, registry)
    results: dict[str, Any] = {"model": entry.name, "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        paths = Paths(
            home=home,
            models_dir=registry.paths.models_dir,
            user_models_file=registry.paths.user_models_file,
        )
        registry = Registry.load(paths)
        engines = LocalEngines(registry, parallel=4, context=2304, n_threads=threads)
        try:
            async with engines.lease(entry.name) as engine:  # loaded before any timing
                pass
            rounds = [await resume_cost(registry, engines, engine, home) for _ in range(repeats)]
            results["resume"] = min(rounds, key=lambda r: r["ratio"])
            results["checkpoint_disk"] = await checkpoint_disk(registry, engines, engine, home)
            text = context_text(engine, 300)
            runner = runner_for(registry, home, engines)
            ours, theirs = [], []
            for _ in range(repeats):
                await engines.clear_caches()
                start = time.perf_counter()
                record = await runner.execute(runner.create(parse_dag(shared_dag(text)), {}).id)
                assert record.status == "succeeded", record.error
                ours.append(time.perf_counter() - start)
                theirs.append(reference_sequential(path, text, threads))
            results["shared_context_dag"] = {
                "pcrt_s": min(ours),
                "sequential_llama_s": min(theirs),
                "ratio": min(ours) / min(theirs),
                "goal": "<= 0.5",
            }
        finally:
            engines.close()
    return results


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    res, dag = r["resume"], r["shared_context_dag"]
    table_rows = [
        (
            f"resume after {res['context_tokens']} tokens",
            f"{1000 * res['first_token_restored_s']:.0f} ms (KV restored)",
            f"{1000 * res['first_token_recomputed_s']:.0f} ms (recomputed)",
            f"1/{1 / res['ratio']:.0f} (<= 1/50)",
        ),
        (
            "parent state blob",
            format_bytes(res["blob_bytes"]),
            f"{format_bytes(res['kv_bytes_estimate'])} (KV of its tokens)",
            "",
        ),
        (
            "300-token context, fork 4, 3 nodes",
            f"{dag['pcrt_s']:.2f} s (DAG)",
            f"{dag['sequential_llama_s']:.2f} s (Llama, one by one)",
            f"{dag['ratio']:.2f} (<= 0.5)",
        ),
    ]
    disk = r["checkpoint_disk"]
    table_rows.append(
        (
            f"checkpoints: {disk['generated_tokens']} tokens after {disk['context_tokens']}",
            f"{format_bytes(disk['bytes_kept'])} kept",
            f"{format_bytes(disk['bytes_written'])} written ({disk['states_written']} states)",
            f"{disk['ratio']:.2f}",
        )
    )
    return table_rows


if __name__ == "__main__":
    run_benchmark(__doc__ or "", "dag", run, rows, repeats=2)
