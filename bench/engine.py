"""Engine benchmarks against references measured in the same run.

    python -m bench.engine [--threads 2] [--repeats 3] [--out bench/results/engine.json]

1. single stream: decode tokens/s of pcrt vs llama-cpp-python's high-level ``Llama``;
2. 4 concurrent streams of 128 tokens: pcrt's aggregate tokens/s vs llama.cpp itself
   decoding 4 sequences per ``llama_decode`` through the raw bindings (no Python engine);
3. fork of 4 over a ~500-token prompt, 64 tokens each, vs 4 independent runs, beside the
   same ratio for llama.cpp alone through the raw bindings (the floor this CPU allows);
4. KV state of a 2,000-token sequence: export + import + first new token vs recomputing
   the prompt, and the blob's bytes vs llama.cpp's own sequence state size.

Runs alternate between pcrt and the reference and keep each side's best of
``--repeats``, because this is a shared 2-core machine: the best run is the one least
disturbed by neighbours, and alternating exposes both sides to the same noise.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp

from bench.common import run_benchmark
from bench.engine_reference import PROMPTS4, STORY
from pcrt.device.units import format_bytes
from pcrt.runtime.engine import Engine, EngineConfig, GenerateRequest, TokenEvent
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry


def best(values: list[float], *, higher: bool) -> float:
    return max(values) if higher else min(values)


# -- 1. single stream ---------------------------------------------------------------


async def ours_single(engine: Engine, max_tokens: int) -> tuple[float, int]:
    stamps: list[float] = []
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    handle = engine.submit(GenerateRequest(prompt=STORY, sampling=sampling))
    async for event in handle:
        if isinstance(event, TokenEvent) and event.token >= 0:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def reference(kind: str, path: Path, threads: int) -> tuple[float, int]:
    """A reference measured in its own process: two llama.cpp contexts that have both
    computed in one process slow each other down badly here (Llama alone: 75 tok/s;
    beside an engine that had run: 16-33 tok/s), which would flatter pcrt."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.engine_reference", kind, str(path), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    rate, tokens = out.stdout.split()
    return float(rate), int(tokens)


# -- 2. four streams ----------------------------------------------------------------


async def ours_four(engine: Engine, n_tokens: int) -> float:
    """Aggregate decode tokens/s once every stream has its first token."""
    no_eos = {engine.model.eos_id: -1e9}
    sampling = SamplingParams(temperature=0.0, max_tokens=n_tokens, logit_bias=no_eos)
    await engine.clear_cache()
    firsts: list[float] = []
    counts = [0] * len(PROMPTS4)

    async def one(i: int, prompt: str) -> float:
        handle = engine.submit(GenerateRequest(prompt=prompt, sampling=sampling))
        async for event in handle:
            if isinstance(event, TokenEvent) and event.token >= 0:
                if counts[i] == 0:
                    firsts.append(time.perf_counter())
                counts[i] += 1
        return time.perf_counter()

    ends = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS4)))
    return (sum(counts) - len(counts)) / (max(ends) - max(firsts))


# -- 3. fork ------------------------------------------------------------------------


def long_prompt(engine: Engine, n_tokens: int) -> list[int]:
    text = (
        "The committee met on Tuesday to review the annual report. Members discussed the "
        "budget, the hiring plan, the new office, and the timeline for the product launch. "
    )
    tokens = engine.model.tokenize(text * (n_tokens // 20 + 10))
    return tokens[:n_tokens]


async def ours_fork(engine: Engine, prompt: list[int], n: int, max_tokens: int) -> float:
    await engine.clear_cache()
    no_eos = {engine.model.eos_id: -1e9}
    sampling = SamplingParams(temperature=0.8, seed=42, max_tokens=max_tokens, logit_bias=no_eos)
    start = time.perf_counter()
    result = await engine.generate(GenerateRequest(prompt=prompt, sampling=sampling, n=n))
    assert result.completion_tokens == n * max_tokens
    return time.perf_counter() - start


async def independent_runs(engine: Engine, prompt: list[int], n: int, max_tokens: int) -> float:
    no_eos = {engine.model.eos_id: -1e9}
    total = 0.0
    for i in range(n):
        await engine.clear_cache()  # each run computes its own prompt
        sampling = SamplingParams(
            temperature=0.8, seed=42 + i, max_tokens=max_tokens, logit_bias=no_eos
        )
        start = time.perf_counter()
        await engine.generate(GenerateRequest(prompt=prompt, sampling=sampling))
        total += time.perf_counter() - start
    return total


# -- 4. state -----------------------------------------------------------------------


async def state_roundtrip(path: Path, sha256: str, threads: int, n_tokens: int) -> dict[str, float]:
    config = EngineConfig(parallel=1, context=n_tokens + 256, n_threads=threads)
    sampling = SamplingParams(temperature=0.0, max_tokens=1)
    with Engine(path, model_sha256=sha256, config=config) as first:
        prompt = long_prompt(first, n_tokens)
        start = time.perf_counter()
        result = await first.generate(
            GenerateRequest(prompt=prompt, sampling=sampling, export_state=True)
        )
        prefill = time.perf_counter() - start
        state = result.choices[0].state
        assert state is not None
        llama_bytes = await first.call(lambda: llama_cpp.llama_state_seq_get_size(first._ctx, 0))
        start = time.perf_counter()
        blob = state.to_bytes()
        to_bytes = time.perf_counter() - start
    with Engine(path, model_sha256=sha256, config=config) as second:
        start = time.perf_counter()
        restored = KVState.from_bytes(blob)
        parse = time.perf_counter() - start
        start = time.perf_counter()
        handle = second.submit(GenerateRequest(prompt=[], state=restored, sampling=sampling))
        first_token: float | None = None
        async for event in handle:
            if isinstance(event, TokenEvent) and first_token is None:
                first_token = time.perf_counter()
        assert first_token is not None
        resume = first_token - start
        assert handle.result is not None and handle.result.cached_tokens == len(state.tokens)
    return {
        "tokens": len(state.tokens),
        "prefill_s": prefill,
        "serialize_s": to_bytes,
        "parse_verify_s": parse,
        "resume_first_token_s": resume,
        "resume_over_prefill": (parse + resume) / prefill,
        "blob_bytes": len(blob),
        "llama_state_bytes": int(llama_bytes),
        "bytes_ratio": len(blob) / llama_bytes,
    }


# -- driver -------------------------------------------------------------------------


async def run(threads: int, repeats: int) -> dict[str, Any]:
    registry = Registry.load()
    entry = registry.resolve(None)
    path = ensure_pulled(entry, registry)
    sha256 = entry.sha256 or ""
    results: dict[str, Any] = {"model": entry.name, "threads": threads, "repeats": repeats}

    # 1. single stream
    ours_rates, ref_rates = [], []
    with open_engine(registry, None, parallel=1, context=2048, n_threads=threads) as engine:
        for _ in range(repeats):
            rate, n_ours = await ours_single(engine, 128)
            ours_rates.append(rate)
            rate, n_ref = reference("single", path, threads)
            ref_rates.append(rate)
    assert n_ours == n_ref, (n_ours, n_ref)
    ours, ref = best(ours_rates, higher=True), best(ref_rates, higher=True)
    results["single_stream"] = {
        "pcrt_tok_s": ours,
        "llama_cpp_python_tok_s": ref,
        "ratio": ours / ref,
        "goal": ">= 0.97",
    }

    # 2. four streams
    ours4, raw4 = [], []
    with open_engine(registry, None, parallel=4, context=1024, n_threads=threads) as engine:
        for _ in range(repeats):
            ours4.append(await ours_four(engine, 128))
            raw4.append(reference("four", path, threads)[0])
    o4, r4 = best(ours4, higher=True), best(raw4, higher=True)
    results["four_streams"] = {
        "pcrt_aggregate_tok_s": o4,
        "raw_llama_decode_tok_s": r4,
        "ratio": o4 / r4,
        "goal": ">= 0.95",
    }

    # 3. fork
    fork_t, indep_t = [], []
    with open_engine(registry, None, parallel=4, context=1024, n_threads=threads) as engine:
        prompt = long_prompt(engine, 500)
        for _ in range(repeats):
            fork_t.append(await ours_fork(engine, prompt, 4, 64))
            indep_t.append(await independent_runs(engine, prompt, 4, 64))
    # the same work by llama.cpp alone (its own process): the ratio this CPU allows
    floors = [reference("fork", path, threads)[0] for _ in range(repeats)]
    f, i = best(fork_t, higher=False), best(indep_t, higher=False)
    results["fork"] = {
        "prompt_tokens": 500,
        "fork_s": f,
        "independent_s": i,
        "ratio": f / i,
        "raw_llama_cpp_ratio": min(floors),
        "raw_llama_cpp_ratios": floors,
        "goal": "<= 0.40",
    }

    # 4. state
    rounds = [await state_roundtrip(path, sha256, threads, 2000) for _ in range(repeats)]
    results["state"] = min(rounds, key=lambda r: r["resume_over_prefill"])
    results["state"]["goal"] = "resume <= 1/50 of prefill; bytes within 5% of llama.cpp's"
    return results


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    s, f, st, four = (results[k] for k in ("single_stream", "fork", "state", "four_streams"))
    table_rows: list[tuple[str, str, str, str]] = [
        (
            "single-stream decode",
            f"{s['pcrt_tok_s']:.1f} tok/s",
            f"{s['llama_cpp_python_tok_s']:.1f} tok/s (Llama)",
            f"{s['ratio']:.3f} (>= 0.97)",
        ),
        (
            "4 streams x 128, aggregate",
            f"{four['pcrt_aggregate_tok_s']:.1f} tok/s",
            f"{four['raw_llama_decode_tok_s']:.1f} tok/s (raw decode)",
            f"{four['ratio']:.3f} (>= 0.95)",
        ),
        (
            "fork 4 x 64 over 500 tokens",
            f"{f['fork_s']:.2f} s",
            f"{f['independent_s']:.2f} s (4 runs)",
            f"{f['ratio']:.3f} (<= 0.40; raw llama.cpp {f['raw_llama_cpp_ratio']:.3f})",
        ),
        (
            f"resume {st['tokens']}-token state",
            f"{1000 * (st['parse_verify_s'] + st['resume_first_token_s']):.1f} ms",
            f"{1000 * st['prefill_s']:.0f} ms (prefill)",
            f"1/{1 / st['resume_over_prefill']:.0f} (<= 1/50)",
        ),
        (
            "state bytes",
            format_bytes(st["blob_bytes"]),
            f"{format_bytes(st['llama_state_bytes'])} (llama.cpp)",
            f"{st['bytes_ratio']:.4f} (within 5%)",
        ),
    ]
    return table_rows


if __name__ == "__main__":
    run_benchmark(__doc__ or "", "engine", run, rows, repeats=3)
