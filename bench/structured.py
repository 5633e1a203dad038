"""Structured output at full speed: constrained decoding against free decoding.

    python -m bench.structured [--threads 2] [--repeats 5] [--out bench/results/structured.json]

1. in-process: one request decoding TOKENS tokens of a nested JSON schema (``$ref``,
   ``enum``, ``format``, ``pattern``, number bounds, arrays) against one decoding TOKENS
   free tokens, same prompt, greedy, the end-of-generation tokens banned so both run the
   full length; pairs back to back, the ratio is the median pair's. Goal >= 0.97. Two
   rates per run: over the whole run, and from the median time between two tokens (the
   VM's bursts move whole 2-second runs by 5-10%; the median step shrugs them off).
   And the cost itself: ``Sampler.sample`` timed per token, free and constrained, and the
   ratio that difference alone implies at the free step time.
2. the old path as the reference, in the same run: llama-cpp-python's ``Llama`` with
   llama.cpp's GBNF sampler (``LlamaGrammar.from_json_schema``: what pcrt ran before),
   constrained against free, same prompt and length.
3. over HTTP: ``pcrt serve`` with 4 slots, 4 concurrent constrained streams against 4
   free ones, aggregate tokens/s (usage's completion tokens over the wall time). Goal >= 0.95.
4. compile time of every schema of ``tests/schema_corpus.py``: checks and conversion
   (``constraint_of``) plus llguidance's compile, each a cache miss; p50 and max; beside
   llama-cpp-python's schema-to-GBNF conversion and llama.cpp's grammar init.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

from bench.common import run_benchmark
from bench.http import session, start_daemon, stop
from pcrt.runtime.engine import Engine, GenerateRequest, TokenEvent
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.constraints import constraint_of
from pcrt.runtime.engine.grammar_compiler import GrammarCompiler
from pcrt.runtime.engine.sampling import Sampler, SamplingParams
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry
from tests.schema_corpus import CORPUS

TOKENS = 200
NO_END = {0: -100.0, 2: -100.0, 4: -100.0}  # SmolLM2's end-of-generation tokens
PROMPT = "List six users of a web app, with their details, as JSON."

USER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 13, "maximum": 120},
        "email": {"type": "string", "format": "email", "maxLength": 40},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["id", "name", "age", "email", "role", "score", "zip", "tags"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "users": {
            "type": "array",
            "items": {"$ref": "#/$defs/user"},
            "minItems": 6,
            "maxItems": 6,
        }
    },
    "required": ["users"],
    "additionalProperties": False,
    "$defs": {"user": USER},
}


# -- 1. in-process ---------------------------------------------------------------------


async def engine_rate(engine: Engine, constrained: bool) -> tuple[float, float]:
    """Decode tokens/s of one run: over the whole run, and 1 / the median time between
    two tokens (robust to the VM's bursts, which move whole runs by 5-10%)."""
    sampling = SamplingParams(
        temperature=0,
        max_tokens=TOKENS,
        logit_bias=NO_END,
        json_schema=SCHEMA if constrained else None,
    )
    messages = [ChatMessage(role="user", content=PROMPT)]
    stamps = []
    handle = engine.submit(GenerateRequest(messages=messages, sampling=sampling))
    async for event in handle:
        if isinstance(event, TokenEvent) and event.token >= 0:
            stamps.append(time.perf_counter())
    result = handle.result
    assert result is not None and result.completion_tokens == TOKENS, result
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return result.decode_tokens_per_second, 1 / step


class SampleTimer:
    """Times ``Sampler.sample`` (the pick of each token, constrained or not) on the
    scheduler thread: the cost a constraint adds, in µs per token, free of the VM's
    noise on whole runs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._real = Sampler.sample

    def __enter__(self) -> SampleTimer:
        real, seconds = self._real, self.seconds

        def timed(sampler: Sampler, ctx: Any, batch_index: int) -> int:
            started = time.perf_counter()
            token = real(sampler, ctx, batch_index)
            seconds.append(time.perf_counter() - started)
            return token

        Sampler.sample = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *_: object) -> None:
        Sampler.sample = self._real  # type: ignore[method-assign]

    def take(self) -> list[float]:
        taken, self.seconds[:] = list(self.seconds), []
        return taken


async def in_process(registry: Registry, threads: int, pairs: int) -> dict[str, Any]:
    engine = open_engine(registry, None, parallel=4, context=2048, n_threads=threads)
    picks: dict[bool, list[float]] = {False: [], True: []}
    try:
        await engine_rate(engine, True)  # warm: the prompt cached, the grammar compiled
        await engine_rate(engine, False)
        free, constrained = [], []
        with SampleTimer() as timer:
            for _ in range(pairs):
                free.append(await engine_rate(engine, False))
                picks[False] += timer.take()
                constrained.append(await engine_rate(engine, True))
                picks[True] += timer.take()
    finally:
        engine.close()
    result = _pairs([f for f, _ in free], [c for c, _ in constrained], "ratio >= 0.97")
    steps = _pairs([f for _, f in free], [c for _, c in constrained], "ratio >= 0.97")
    result["median_step"] = steps
    # what a token's pick costs, and the ratio that cost alone implies at the free step
    free_us = 1e6 * statistics.mean(picks[False])
    schema_us = 1e6 * statistics.mean(picks[True])
    step_us = 1e6 / steps["free_tok_s"]
    result["pick_us"] = {
        "free": free_us,
        "schema": schema_us,
        "schema_p99": 1e6 * sorted(picks[True])[int(0.99 * len(picks[True]))],
        "implied_ratio": step_us / (step_us + schema_us - free_us),
    }
    return result


# -- 2. the old path: llama.cpp's GBNF sampler -------------------------------------------


def llama_rate(llm: Any, grammar: LlamaGrammar | None) -> float:
    stamps = []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=TOKENS,
        temperature=0,
        logit_bias={str(k): v for k, v in NO_END.items()},
        grammar=grammar,
        stream=True,
    ):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def gbnf_reference(path: Path, threads: int, pairs: int) -> dict[str, Any]:
    llm = llama_cpp.Llama(str(path), n_threads=threads, n_ctx=2048, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    try:
        llama_rate(llm, grammar)
        free, constrained = [], []
        for _ in range(pairs):
            free.append(llama_rate(llm, None))
            constrained.append(llama_rate(llm, grammar))
    finally:
        llm.close()
    return _pairs(free, constrained, "reference (pcrt before: GBNF)")


# -- 3. over HTTP ------------------------------------------------------------------------


async def stream_tokens(client: aiohttp.ClientSession, url: str, model: str, strict: bool) -> int:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(k): v for k, v in NO_END.items()},
    }
    if strict:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "users", "schema": SCHEMA, "strict": True},
        }
    tokens = 0
    async with client.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def four_streams(url: str, model: str, constrained: bool) -> float:
    async with session() as client:
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(stream_tokens(client, url, model, constrained) for _ in range(4))
        )
        wall = time.perf_counter() - started
    assert counts == [TOKENS] * 4, counts
    return sum(counts) / wall


async def over_http(model: str, threads: int, pairs: int) -> dict[str, Any]:
    daemon, url = start_daemon(threads, 4)
    try:
        await four_streams(url, model, True)
        free, constrained = [], []
        for _ in range(pairs):
            free.append(await four_streams(url, model, False))
            constrained.append(await four_streams(url, model, True))
    finally:
        stop(daemon)
    return _pairs(free, constrained, "ratio >= 0.95")


# -- 4. compile times ----------------------------------------------------------------------


def corpus_compile_times(engine: Engine) -> dict[str, Any]:
    # a compiler of its own, so every compile is a miss; the engine holds the model open
    grammars = GrammarCompiler(engine.model, contextlib.nullcontext, capacity=0)
    started = time.perf_counter()
    grammars.tokenizer()
    tokenizer_s = time.perf_counter() - started
    ours, theirs = [], []
    refused = []  # by llama-cpp-python's converter (recursive $refs)
    for case in CORPUS:
        started = time.perf_counter()
        constraint = constraint_of(case.schema, None)
        assert constraint is not None
        grammars.compile(constraint)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            gbnf = json_schema_to_gbnf(json.dumps(case.schema))
        except Exception:  # it raises bare KeyErrors
            refused.append(case.name)
            continue
        sampler = llama_cpp.llama_sampler_init_grammar(engine.model.vocab, gbnf.encode(), b"root")
        theirs.append(time.perf_counter() - started)
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
    return {
        "schemas": len(CORPUS),
        "tokenizer_ms": tokenizer_s * 1000,
        "llguidance_p50_ms": statistics.median(ours) * 1000,
        "llguidance_max_ms": max(ours) * 1000,
        "gbnf_p50_ms": statistics.median(theirs) * 1000,
        "gbnf_max_ms": max(theirs) * 1000,
        "gbnf_refused": refused,
    }


# -- the run -----------------------------------------------------------------------------


def _pairs(free: list[float], constrained: list[float], goal: str) -> dict[str, Any]:
    ratios = [c / f for c, f in zip(constrained, free, strict=True)]
    return {
        "free_tok_s": statistics.median(free),
        "constrained_tok_s": statistics.median(constrained),
        "ratio": statistics.median(ratios),
        "ratio_per_pair": ratios,
        "goal": goal,
    }


async def run(threads: int, repeats: int) -> dict[str, Any]:
    registry = Registry.load()
    entry = registry.resolve(None)
    path = ensure_pulled(entry, registry)
    results: dict[str, Any] = {"model": entry.name, "threads": threads, "tokens": TOKENS}
    engine = open_engine(registry, None, parallel=1, context=2048, n_threads=threads)
    try:
        results["compile"] = corpus_compile_times(engine)
    finally:
        engine.close()
    results["in_process"] = await in_process(registry, threads, repeats)
    results["gbnf_reference"] = gbnf_reference(path, threads, max(3, repeats // 2))
    results["http_four_streams"] = await over_http(entry.name, threads, max(3, repeats // 2))
    return results


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    i, g, h, c = r["in_process"], r["gbnf_reference"], r["http_four_streams"], r["compile"]
    p = i["pick_us"]
    return [
        (
            f"in-process, {r['tokens']} tokens",
            f"{i['constrained_tok_s']:.1f} tok/s (schema)",
            f"{i['free_tok_s']:.1f} tok/s (free)",
            f"{i['ratio']:.3f} (>= 0.97)",
        ),
        (
            "in-process, median step",
            f"{i['median_step']['constrained_tok_s']:.1f} tok/s (schema)",
            f"{i['median_step']['free_tok_s']:.1f} tok/s (free)",
            f"{i['median_step']['ratio']:.3f} (>= 0.97)",
        ),
        (
            "in-process, pick per token",
            f"{p['schema']:.0f} us (schema; p99 {p['schema_p99']:.0f})",
            f"{p['free']:.0f} us (free)",
            f"{p['implied_ratio']:.3f} (implied)",
        ),
        (
            "llama.cpp GBNF (old path)",
            f"{g['constrained_tok_s']:.1f} tok/s (schema)",
            f"{g['free_tok_s']:.1f} tok/s (free, Llama)",
            f"{g['ratio']:.3f} (reference)",
        ),
        (
            "HTTP, 4 streams",
            f"{h['constrained_tok_s']:.1f} tok/s (schema)",
            f"{h['free_tok_s']:.1f} tok/s (free)",
            f"{h['ratio']:.3f} (>= 0.95)",
        ),
        (
            f"compile, {c['schemas']} schemas",
            f"p50 {c['llguidance_p50_ms']:.2f} ms, max {c['llguidance_max_ms']:.2f} ms",
            f"GBNF p50 {c['gbnf_p50_ms']:.2f} ms, max {c['gbnf_max_ms']:.2f} ms"
            f" ({len(c['gbnf_refused'])} refused)",
            f"tokenizer once {c['tokenizer_ms']:.0f} ms",
        ),
    ]


if __name__ == "__main__":
    run_benchmark(__doc__ or "", "structured", run, rows, repeats=5)
