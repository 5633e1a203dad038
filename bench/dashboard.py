"""What the dashboard costs the daemon: a DAG node's decode speed while dashboard tabs
follow its run, and the usage chart's read of a large usage table, with /health's
latency while it reads.

    python -m bench.dashboard [--threads 2] [--repeats 3] [--out bench/results/dashboard.json]

- "decode, 3 tabs watching": tokens/s of a 400-token DAG node while three clients read
  ``GET /v1/dags/{id}/events`` (every token is an event to each), against the same node
  with nobody watching, in the same daemon, alternating; goal >= 0.97.
- "usage chart, N rows": ``GET /v1/pcrt/usage?window_s=86400`` over a table of N rows
  spread over a day and 20 agents (written in time order, as the daemon writes them),
  against ``pcrt usage``'s own summary query on the same table (``UsageLog.summary`` in
  this process); goal: under 0.25 s, and ``/health`` never over 50 ms while it runs
  (the read is in a worker thread).

Run it on a quiet machine (no tests, no helpers): two llama.cpp processes on two cores
slow each other about tenfold. Uses ``PCRT_HOME`` and ``PCRT_MODELS_DIR`` as it finds
them, with a fresh home of its own for the daemon.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.common import run_benchmark
from bench.http import environment, start_daemon, stop
from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog, UsageRecord

GOAL_DECODE_RATIO = 0.97
GOAL_USAGE_S = 0.25
GOAL_HEALTH_S = 0.05
WATCHERS = 3
USAGE_ROWS = 100_000
NODE = """
dag: /dynamic/bench_dashboard
inputs: {start: {type: string}}
nodes:
  count:
    type: llm
    tag: simple
    prompt: "List the numbers from {{ inputs.start }} to 900, separated by commas:"
    temperature: 0
    max_tokens: 400
"""


async def _watch(client: httpx.AsyncClient, run_id: str) -> int:
    """Events read from the run's watching stream until it ends."""
    seen = 0
    async with client.stream("GET", f"/v1/dags/{run_id}/events") as events:
        async for line in events.aiter_lines():
            seen += line.startswith("event:")
    return seen


async def _node_speed(client: httpx.AsyncClient, watchers: int, start: int) -> dict[str, Any]:
    """One run of the node with ``watchers`` tabs; ``start``: a number no other run of
    this bench used (a new input, so no cache hit; a plain number, so the model lists
    numbers for all its tokens rather than stopping early)."""
    body = {"dag": NODE, "inputs": {"start": str(start)}}
    answer = await client.post("/v1/dags", json={**body, "wait": False})
    answer.raise_for_status()
    run_id = answer.json()["id"]
    watching = [asyncio.create_task(_watch(client, run_id)) for _ in range(watchers)]
    while True:  # the same light polling in both variants
        view = (await client.get(f"/v1/dags/{run_id}")).json()
        if view["status"] not in ("pending", "running"):
            break
        await asyncio.sleep(0.5)
    events = await asyncio.gather(*watching)
    node = view["nodes"][0]
    if node["completion_tokens"] != 400:  # a short answer says nothing of decode speed
        raise RuntimeError(f"the node generated {node['completion_tokens']} tokens, not 400")
    return {
        "status": view["status"],
        "tokens": node["completion_tokens"],
        "seconds": node["seconds"],
        "tokens_per_s": node["completion_tokens"] / node["seconds"],
        "events_per_watcher": events,
    }


def _fill_usage(db: Path, rows: int) -> float:
    """``rows`` usage rows over the last day (20 agents); the seconds that
    ``UsageLog.summary`` (what ``pcrt usage`` prints) takes over them, median of 5."""
    now = datetime.datetime.now(datetime.UTC)
    records = [
        asdict(
            UsageRecord(
                agent=f"agent-{i % 20}",
                model="smollm2-135m",
                route="/v1/chat/completions",
                status=200,
                prompt_tokens=40,
                completion_tokens=60,
                total_ms=500.0,
                ts=(now - datetime.timedelta(seconds=random.uniform(0, 86000))).isoformat(
                    timespec="microseconds"
                ),
            )
        )
        for i in range(rows)
    ]
    records.sort(key=lambda record: record["ts"])  # as the daemon writes them: in time
    with Store(db) as store:
        store.db.table("usage").insert_all(records, batch_size=5000)
        log = UsageLog(store)
        since = (now - datetime.timedelta(days=1)).isoformat(timespec="microseconds")
        spent = []
        for _ in range(5):
            began = time.perf_counter()
            log.summary(since=since)
            spent.append(time.perf_counter() - began)
        log.close()
    return statistics.median(spent)


async def _usage_reads(client: httpx.AsyncClient) -> dict[str, Any]:
    """The chart's read, 5 times, with /health probed every 10 ms meanwhile."""
    worst = 0.0
    reading = True

    async def probe() -> None:
        nonlocal worst
        while reading:
            began = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            worst = max(worst, time.perf_counter() - began)
            await asyncio.sleep(0.01)

    prober = asyncio.create_task(probe())
    spent = []
    for _ in range(5):
        began = time.perf_counter()
        answer = await client.get("/v1/pcrt/usage", params={"window_s": 86400})
        answer.raise_for_status()
        spent.append(time.perf_counter() - began)
    reading = False
    await prober
    series = answer.json()["series"]
    return {
        "seconds": statistics.median(spent),
        "health_worst_s": worst,
        "buckets": len({row["start"] for row in series}),
        "rows_counted": sum(row["requests"] for row in series),
    }


async def run(threads: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-dashboard-") as home:
        summary_s = _fill_usage(Path(home) / "pcrt.db", USAGE_ROWS)
        with environment(PCRT_HOME=home):
            proc, url = start_daemon(threads, 1)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                starts = iter(random.sample(range(1, 400), 2 * repeats + 1))
                await _node_speed(client, 0, next(starts))  # loads the model; not counted
                pairs = []
                for _ in range(repeats):
                    alone = await _node_speed(client, 0, next(starts))
                    watched = await _node_speed(client, WATCHERS, next(starts))
                    pairs.append({"alone": alone, "watched": watched})
                usage = await _usage_reads(client)
        finally:
            stop(proc)
    ratios = [p["watched"]["tokens_per_s"] / p["alone"]["tokens_per_s"] for p in pairs]
    return {
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "pairs": pairs,
        "decode_ratio": statistics.median(ratios),
        "alone_tokens_per_s": statistics.median(p["alone"]["tokens_per_s"] for p in pairs),
        "watched_tokens_per_s": statistics.median(p["watched"]["tokens_per_s"] for p in pairs),
        "usage_rows": USAGE_ROWS,
        "usage": usage,
        "summary_s": summary_s,
    }


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    ratio = results["decode_ratio"]
    usage = results["usage"]
    verdict = "pass" if ratio >= GOAL_DECODE_RATIO else "FAIL"
    fast = usage["seconds"] < GOAL_USAGE_S and usage["health_worst_s"] < GOAL_HEALTH_S
    return [
        (
            f"decode, {WATCHERS} tabs watching",
            f"{results['watched_tokens_per_s']:.1f} tok/s",
            f"{results['alone_tokens_per_s']:.1f} tok/s (none)",
            f"{ratio:.3f} (>= {GOAL_DECODE_RATIO}) {verdict}",
        ),
        (
            f"usage chart, {results['usage_rows']:,} rows",
            f"{usage['seconds'] * 1000:.0f} ms "
            f"(/health worst {usage['health_worst_s'] * 1000:.1f} ms)",
            f"{results['summary_s'] * 1000:.0f} ms (pcrt usage's query)",
            f"{usage['seconds'] / results['summary_s']:.2f} (< {GOAL_USAGE_S * 1000:.0f} ms, "
            f"/health < {GOAL_HEALTH_S * 1000:.0f} ms) {'pass' if fast else 'FAIL'}",
        ),
    ]


if __name__ == "__main__":
    run_benchmark(__doc__ or "", "dashboard", run, rows, repeats=3)
