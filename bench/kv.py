"""The KV chunk store: a swarm of agents whose prompts come back from RAM and disk.

    python -m bench.kv [--threads 2] [--agents 8] [--rounds 3] [--prompt-tokens 740]
                       [--out bench/results/kv.json]
    LLAMA_SERVER=/path/to/llama-server python -m bench.kv   # adds llama-server's rows

``pcrt serve`` on a fresh ``PCRT_HOME`` (4 slots, 2,048 tokens of context each, the
default model, the chunk store's default settings), warmed up on prompts that share
nothing with the agents' but the template's start.

1. Swarm: 8 agents, each with a system prompt of its own (a rule book of about 740
   tokens that starts with the agent's name, so two agents' prompts part after the
   template's first few tokens), 3 rounds; within a round the agents go 2 at a time
   (0 and 1 together, then 2 and 3, ...). A turn is one streamed chat completion: the
   agent's system prompt and a short user message (another each round), 8 tokens,
   greedy, the end tokens banned. Eight agents on four slots: by an agent's next turn
   its slot holds someone else, so its prompt comes back from the store or is computed
   again. Measured: each turn's time to first token (from the request sent to the first
   content delta, at the client) and its ``cached_tokens`` (``stream_options``'
   usage), the store's stats (``GET /v1/pcrt/cache``) after each round. The cold round
   (1) against the warm ones (2 and on): mean TTFT, warm / cold. Goal <= 0.1.
   The same swarm against llama-server (``-np 4``, the same model file and threads,
   ``-c`` 4 x 2,048: its context is the total; its default ``--cache-ram``) when the
   environment variable ``LLAMA_SERVER`` names its binary, skipped otherwise: pcrt's
   warm mean / llama-server's warm mean. Goal <= 0.5. And the floor: the same swarm
   on a daemon with a slot per agent (nothing evicted, nothing restored), whose warm
   turns compute only what no cache can hold (the new message and the turn markers
   around it): what both servers' warm turns are measured against.
2. Restart: the daemon stopped after the swarm and a new one started on the same
   ``PCRT_HOME`` (the RAM tier is gone, the disk tier survives), warmed up the same way;
   one round of the same agents (2 at a time, a new user message). Its mean TTFT / the
   swarm's cold mean. Goal <= 0.15.

3. Restore: 1,000 tokens back into a slot as chunks (joined, framed, set), from the RAM
   tier and from the disk tier (read and checked), against a whole state's blob
   (mapped, checked, imported), in this process: tokens/s. Goal >= 0.8 of the blob's.
4. Fork: 4 branches of 64 tokens over a 1,000-token context, each branch's state
   exported and kept as a chunked state: the bytes stored (their shared chunks once)
   against one branch's whole state. Goal <= 1.3. And bench.engine's fork (4 x 64 over
   500 tokens, over 4 independent runs) against llama.cpp's own fork (one prefill,
   ``seq_cp``) in its own process: goal <= 1.05.
5. Checkpoints: a DAG node of 512 tokens after a ~1,000-token context node, a
   checkpoint every 64 tokens: the bytes of states and chunks written while it ran,
   against the KV of its own 512 tokens (goal <= 1.2); the same node keeping whole
   states, for reference.
6. A move: two daemons on loopback; the peer ran the same context node before (its
   store holds those chunks); the edge runs the context and a long node and moves the
   run at the long node's first checkpoint: bytes sent against the KV of the states it
   moves. Goal <= 0.10.

``--agents``, ``--rounds`` (at least 2) and ``--prompt-tokens`` (each system prompt's
tokens) make quick runs for debugging; ``--repeats``, which every bench takes, is not
used: the warm rounds are the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.common import run_benchmark
from bench.dag import FILLER
from bench.http import environment, free_port, start, start_daemon, stop, until_model_loaded
from bench.kv_states import checkpoints, fork, fork_time, restore_rate
from bench.peers import Daemon, finished_run, in_rotation, move_at_first_checkpoint, wait_until
from pcrt.cache.chunks import ChunkStore
from pcrt.cache.store import Store
from pcrt.device.units import format_bytes
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths

GiB = 1024**3
PARALLEL = 4  # slots, pcrt's and llama-server's
CONTEXT = 2048  # tokens per slot (start_daemon's --ctx)
AT_A_TIME = 2  # agents whose turns run together
REPLY_TOKENS = 8
NO_END = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens
AGENTS, ROUNDS, PROMPT_TOKENS = 8, 3, 740
GOAL_WARM, GOAL_VERSUS, GOAL_RESTART = 0.1, 0.5, 0.15

NAMES = ("Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Ginkgo", "Hazel")
DUTIES = (
    "checks the harbour ledger",
    "counts the crates on the east pier",
    "writes the weather into the log",
    "answers the radio from the north station",
    "inspects the lamps of the lighthouse",
    "signs the cargo manifests",
    "tests the fog horn",
    "measures the depth at the channel mouth",
    "repairs the nets of the fishing boats",
    "reports the tides to the harbour master",
    "sorts the mail for the island",
    "guards the fuel depot",
)
WHEN = (
    "before the first ferry leaves",
    "every hour on the hour",
    "whenever the wind turns west",
    "after the evening bell",
    "twice on market days",
    "only when the flag is raised",
    "before anyone else arrives",
    "unless the tide is low",
)
WHY = (
    "because the insurers ask for it",
    "so that nothing is lost twice",
    "as the old keepers always did",
    "since the council voted on it",
    "to keep the crews safe",
    "for the records of the port",
)
QUESTIONS = (
    "Which of your rules comes first today?",
    "Name one duty you have before noon.",
    "What do you check when the wind turns?",
    "Which rule would you change, and why?",
    "What is the last thing you do at night?",
)
WARM_UP = "Tell me about the history of bread, from the first grains to the modern bakery. " * 12


def rule_book(agent: int, agents: int) -> list[str]:
    """Agent ``agent``'s system prompt, sentence by sentence: its name first, then rules
    drawn from its own seed (enough for any length this bench asks for)."""
    name = NAMES[agent % len(NAMES)] + (f"-{agent // len(NAMES) + 1}" if agent >= 8 else "")
    rng = random.Random(agent)
    lines = [
        f"You are {name}, agent {agent + 1} of a swarm of {agents} harbour agents. "
        f"Follow the rule book of {name} below and answer in a few words.\n"
    ]
    for k in range(1, 400):
        duty, when, why = rng.choice(DUTIES), rng.choice(WHEN), rng.choice(WHY)
        lines.append(f"Rule {k} of {name}: {name} {duty} {when}, {why}.\n")
    return lines


def system_prompts(model: LlamaModel, agents: int, n_tokens: int) -> list[str]:
    """Each agent's rule book cut to the most sentences within ``n_tokens`` tokens."""
    prompts = []
    for agent in range(agents):
        lines = rule_book(agent, agents)
        lo, hi = 1, len(lines)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            text = "".join(lines[:mid])
            if len(model.tokenize(text, add_special=False, parse_special=False)) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        prompts.append("".join(lines[:lo]).rstrip("\n"))
    return prompts


def user_message(round_: int) -> str:
    return f"Round {round_}. {QUESTIONS[(round_ - 1) % len(QUESTIONS)]}"


async def turn(
    client: aiohttp.ClientSession, url: str, model: str, system: str, user: str
) -> dict[str, Any]:
    """One streamed turn: time to the first content delta, and the usage's counts."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": NO_END,
    }
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    async with client.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(
                (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []
            ):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings  # llama-server's
    if first is None:
        raise RuntimeError(f"{url}: a turn streamed no content")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = timings.get("cache_n")
    return {
        "ttft_s": first - started,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": cached,
    }


def connections() -> aiohttp.ClientSession:
    """A new connection for each request: llama-server (cpp-httplib) closes a connection
    kept alive after a few requests, which aiohttp learns only as it sends the next one.
    Both servers pay the same loopback connect."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)


async def rounds_of(
    url: str, model: str, prompts: list[str], first: int, n_rounds: int, store: bool
) -> list[dict[str, Any]]:
    """``n_rounds`` rounds of every agent's turn, AT_A_TIME agents together; each round's
    turns, mean TTFT and (``store``: pcrt) the chunk store's stats after it."""
    done = []
    async with connections() as client:
        for round_ in range(first, first + n_rounds):
            turns: list[dict[str, Any]] = []
            for start_at in range(0, len(prompts), AT_A_TIME):
                group = range(start_at, min(start_at + AT_A_TIME, len(prompts)))
                answers = await asyncio.gather(
                    *(turn(client, url, model, prompts[a], user_message(round_)) for a in group)
                )
                turns += [{"agent": a, **answer} for a, answer in zip(group, answers, strict=True)]
            done.append(
                {
                    "round": round_,
                    "mean_ttft_s": statistics.mean(t["ttft_s"] for t in turns),
                    "turns": turns,
                    "store": (await cache_stats(url))["store"] if store else None,
                }
            )
            print(
                f"... round {round_}: mean TTFT {1000 * done[-1]['mean_ttft_s']:.0f} ms, "
                f"cached {[t['cached_tokens'] for t in turns]}",
                file=sys.stderr,
                flush=True,
            )
    return done


async def warm_up(url: str, model: str) -> None:
    """The model loaded and two sequences decoded together, on a prompt that shares
    nothing with the agents' but the template's start."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": WARM_UP}],
        "max_tokens": 4,
        "temperature": 0,
    }
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(2):
            answers = await asyncio.gather(
                *(client.post(url + "/v1/chat/completions", json=body) for _ in range(2))
            )
            for r in answers:
                assert r.status_code == 200, r.text


async def cache_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(url + "/v1/pcrt/cache")
        r.raise_for_status()
        stats: dict[str, Any] = r.json()
        return stats


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    cold = rounds[0]["mean_ttft_s"]
    warm = statistics.mean(t["ttft_s"] for r in rounds[1:] for t in r["turns"])
    return {"cold_ttft_s": cold, "warm_ttft_s": warm, "ratio": warm / cold, "rounds": rounds}


async def run(options: argparse.Namespace, threads: int, repeats: int) -> dict[str, Any]:
    del repeats  # the warm rounds are the repeats
    if options.rounds < 2 or options.agents < 1:
        raise SystemExit("--rounds must be at least 2 (one cold, one warm), --agents at least 1")
    if options.prompt_tokens + 64 + REPLY_TOKENS > CONTEXT:  # the template and user message
        raise SystemExit(f"--prompt-tokens: a turn must fit a slot's {CONTEXT} tokens")
    registry = Registry.load()
    entry = registry.resolve(None)
    gguf = ensure_pulled(entry, registry)
    tokenizer = LlamaModel(gguf)
    try:
        prompts = system_prompts(tokenizer, options.agents, options.prompt_tokens)
        prompt_lengths = [
            len(tokenizer.tokenize(p, add_special=False, parse_special=False)) for p in prompts
        ]
    finally:
        tokenizer.close()
    results: dict[str, Any] = {
        "model": entry.name,
        "threads": threads,
        "parallel": PARALLEL,
        "context_per_slot": CONTEXT,
        "agents": options.agents,
        "rounds": options.rounds,
        "at_a_time": AT_A_TIME,
        "reply_tokens": REPLY_TOKENS,
        "system_prompt_tokens": prompt_lengths,
    }
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-kv-") as tmp:
        env = {
            "PCRT_HOME": str(Path(tmp) / "home"),
            "PCRT_MODELS_DIR": str(Paths.from_env().models_dir),  # the model pulled once
            "PCRT_CONFIG": str(Path(tmp) / "config.toml"),  # none: the default settings
        }

        # 1. the swarm
        with environment(**env):
            daemon, url = start_daemon(threads, PARALLEL)
        try:
            await warm_up(url, entry.name)
            rounds = await rounds_of(url, entry.name, prompts, 1, options.rounds, store=True)
            swarm = summary(rounds)
            swarm["cache"] = await cache_stats(url)
            swarm["goal"] = f"warm / cold <= {GOAL_WARM}"
            results["swarm_pcrt"] = swarm
        finally:
            stop(daemon)

        # 2. a new daemon on the same home: the disk tier only
        with environment(**env):
            daemon, url = start_daemon(threads, PARALLEL)
        try:
            await warm_up(url, entry.name)
            (after,) = await rounds_of(url, entry.name, prompts, options.rounds + 1, 1, store=True)
            results["restart"] = {
                "ttft_s": after["mean_ttft_s"],
                "cold_ttft_s": swarm["cold_ttft_s"],
                "ratio": after["mean_ttft_s"] / swarm["cold_ttft_s"],
                "round": after,
                "cache": await cache_stats(url),
                "goal": f"restart / cold <= {GOAL_RESTART}",
            }
        finally:
            stop(daemon)

    # the floor: every agent a slot of its own (no restore at all, nothing evicted): a
    # warm turn computes only what no cache can hold, the new user message and the turn
    # markers around it
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-kv-floor-") as tmp:
        env["PCRT_HOME"] = str(Path(tmp) / "home")
        with environment(**env):
            daemon, url = start_daemon(threads, max(PARALLEL, options.agents))
        try:
            await warm_up(url, entry.name)
            floor = summary(await rounds_of(url, entry.name, prompts, 1, 2, store=False))
            results["floor"] = {
                "slots": max(PARALLEL, options.agents),
                "warm_ttft_s": floor["warm_ttft_s"],
                "rounds": floor["rounds"],
            }
        finally:
            stop(daemon)

    # the reference: llama-server, the same swarm
    server = os.environ.get("LLAMA_SERVER")
    if server:
        port = free_port()
        ref_url = f"http://127.0.0.1:{port}"
        cmd = [server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-t", str(threads), "-c", str(PARALLEL * CONTEXT), "-np", str(PARALLEL)]
        cmd += ["--jinja"]
        proc = start(cmd, ref_url)
        try:
            until_model_loaded(ref_url)
            await warm_up(ref_url, entry.name)
            theirs = summary(
                await rounds_of(ref_url, entry.name, prompts, 1, options.rounds, store=False)
            )
        finally:
            stop(proc)
        theirs["command"] = cmd
        results["swarm_llama_server"] = theirs
        results["versus_llama_server"] = {
            "pcrt_warm_ttft_s": swarm["warm_ttft_s"],
            "llama_server_warm_ttft_s": theirs["warm_ttft_s"],
            "ratio": swarm["warm_ttft_s"] / theirs["warm_ttft_s"],
            "goal": f"pcrt warm / llama-server warm <= {GOAL_VERSUS}",
        }

    # 3.-6. states as chunks, in this process: restore, fork, checkpoints; then a move
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-kv-engine-") as tmp:
        home = Path(tmp)
        with Store(home / "pcrt.db") as store:
            chunks = ChunkStore(store, home / "chunks", ram_bytes=GiB, disk_bytes=10 * GiB)
            engine = open_engine(
                registry, None, parallel=4, context=2048, n_threads=threads, chunks=chunks
            )
            try:
                results["restore"] = await restore_rate(engine, chunks, home)
                results["fork"] = await fork(engine, chunks)
            finally:
                engine.close()
                chunks.close()
    with open_engine(registry, None, parallel=4, context=1024, n_threads=threads) as engine:
        results["fork"].update(await fork_time(engine, threads, repeats=2))
    kv_per_token = results["restore"]["kv_per_token"]
    results["checkpoints"] = await checkpoints(threads, kv_per_token)
    results["move"] = await asyncio.to_thread(move, threads, kv_per_token)
    return results


# -- 4. a move to a peer that holds the run's context ---------------------------------

CONTEXT_TEXT = FILLER * 30  # about 1,000 tokens, which the model repeats at length


def move_dag(long: bool) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "context": {
            "type": "llm",
            "prompt": CONTEXT_TEXT,
            "route": "local",
            "temperature": 0,
            "max_tokens": 8,
            "cache": False,
        }
    }
    if long:
        nodes["long"] = {
            "type": "llm",
            "context": "context",
            "prompt": "Repeat the text above word for word.",
            "route": "local",
            "temperature": 0,
            "max_tokens": 256,
            "checkpoint_every": 32,
            "cache": False,
        }
    return {"dag": "/dynamic/bench-kv-move", "nodes": nodes}


def move(threads: int, kv_per_token: int) -> dict[str, Any]:
    """The peer ran the same context before (its chunk store holds it); the edge runs the
    context and a long node, and moves the run at the long node's first checkpoint."""
    key = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-kv-move-") as tmp:
        edge = Daemon("bench-kv-edge", key, threads, Path(tmp))
        peer = Daemon("bench-kv-peer", key, threads, Path(tmp))
        try:
            edge.start()
            peer.start()
            edge.wait_up()
            peer.wait_up()
            with httpx.Client(timeout=600, trust_env=False) as client:
                wait_until(lambda: in_rotation(edge, peer.name, client), 30)
                held = client.post(peer.url + "/v1/dags", json={"dag": move_dag(False)}).json()
                assert held["status"] == "succeeded", held
                to = {"to": peer.name}
                run_id, moved, _ = move_at_first_checkpoint(client, edge.url, move_dag(True), to)
                states = client.get(edge.url + "/v1/states", params={"run_id": run_id}).json()
                view = finished_run(client, peer.url, run_id, interval=0.1)
        finally:
            edge.stop()
            peer.stop()
    tokens = sum(s["tokens"] or 0 for s in states["data"])
    whole = tokens * kv_per_token
    long = next(n for n in view["nodes"] if n["node_id"] == "long")
    return {
        "states": len(states["data"]),
        "state_tokens": tokens,
        "whole_kv_bytes": whole,
        "bytes_sent": moved.get("bytes_sent"),
        "chunks_sent": moved.get("chunks_sent"),
        "chunks_held": moved.get("chunks_held"),
        "ratio": moved["bytes_sent"] / whole,
        "peer_status": view.get("status"),
        "resumed_from_checkpoint": long.get("resumed_from_checkpoint"),
        "goal": "<= 0.10",
    }


def verdict(ratio: float, goal: float) -> str:
    return f"{ratio:.3f} (<= {goal:g}) {'pass' if ratio <= goal else 'FAIL'}"


def verdict_at_least(ratio: float, goal: float) -> str:
    return f"{ratio:.3f} (>= {goal:g}) {'pass' if ratio >= goal else 'FAIL'}"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    swarm, restart = r["swarm_pcrt"], r["restart"]
    warm_rounds = f"rounds 2-{r['rounds']}" if r["rounds"] > 2 else "round 2"
    agents = f"{r['agents']} agents, {r['parallel']} slots"
    table = [
        (
            f"swarm ({agents}), TTFT warm / cold",
            f"{ms(swarm['warm_ttft_s'])} ({warm_rounds})",
            f"{ms(swarm['cold_ttft_s'])} (round 1)",
            verdict(swarm["ratio"], GOAL_WARM),
        )
    ]
    theirs = r.get("swarm_llama_server")
    if theirs is not None:
        table += [
            (
                "llama-server swarm, TTFT warm / cold",
                f"{ms(theirs['warm_ttft_s'])} ({warm_rounds})",
                f"{ms(theirs['cold_ttft_s'])} (round 1)",
                f"{theirs['ratio']:.3f}",
            ),
            (
                "swarm, warm TTFT vs llama-server",
                ms(swarm["warm_ttft_s"]),
                f"{ms(theirs['warm_ttft_s'])} (llama-server -np {r['parallel']})",
                verdict(r["versus_llama_server"]["ratio"], GOAL_VERSUS),
            ),
        ]
    floor = r["floor"]["warm_ttft_s"]
    versus = f"{r['parallel']} slots: {ms(swarm['warm_ttft_s'])} (pcrt)"
    above = f"{swarm['warm_ttft_s'] / floor:.2f}x the floor (pcrt)"
    if theirs is not None:
        versus += f", {ms(theirs['warm_ttft_s'])} (llama-server)"
        above += f", {theirs['warm_ttft_s'] / floor:.2f}x (llama-server)"
    name = f"  the floor: {r['floor']['slots']} slots, none evicted"
    table.append((name, ms(floor), versus, above))
    table.append(
        (
            "restart, TTFT from disk / cold",
            f"{ms(restart['ttft_s'])} (new daemon)",
            f"{ms(restart['cold_ttft_s'])} (swarm round 1)",
            verdict(restart["ratio"], GOAL_RESTART),
        )
    )
    rest, fk, ck, mv = r["restore"], r["fork"], r["checkpoints"], r["move"]
    table += [
        (
            f"restore {rest['chunk_tokens']} tokens from RAM chunks",
            f"{rest['ram_tok_s']:,.0f} tok/s ({ms(rest['ram_chunks_s'])})",
            f"{rest['whole_tok_s']:,.0f} tok/s (whole blob, {ms(rest['whole_blob_s'])})",
            verdict_at_least(rest["ratio"], 0.8),
        ),
        (
            "  the same from disk chunks (read, checked)",
            f"{rest['disk_tok_s']:,.0f} tok/s ({ms(rest['disk_chunks_s'])})",
            f"{rest['whole_tok_s']:,.0f} tok/s (whole blob)",
            verdict_at_least(rest["disk_ratio"], 0.8),
        ),
        (
            "fork 4 x 64 over 1,000 tokens: bytes stored",
            f"{format_bytes(fk['stored_bytes'])} (4 chunked states)",
            f"{format_bytes(fk['one_branch_bytes'])} (one branch whole; 4: "
            f"{format_bytes(fk['whole_bytes'])})",
            verdict(fk["bytes_ratio"], 1.3),
        ),
        (
            "fork 4 x 64 over 500 tokens: time vs llama.cpp",
            f"{fk['fork_ratio']:.3f} of 4 runs",
            f"{fk['llama_cpp_fork_ratio']:.3f} of 4 runs (llama.cpp, seq_cp)",
            verdict(fk["time_ratio"], 1.05),
        ),
        (
            f"checkpoints: {ck['chunked']['generated_tokens']} tokens after "
            f"{ck['chunked']['context_tokens']}, every 64",
            f"{format_bytes(ck['chunked']['written'])} written",
            f"{format_bytes(ck['own_kv_bytes'])} (KV of its tokens); whole states: "
            f"{format_bytes(ck['whole']['written'])} ({ck['whole_ratio']:.1f}x)",
            verdict(ck["ratio"], 1.2),
        ),
        (
            "move to a peer holding the context",
            f"{format_bytes(mv['bytes_sent'])} sent ({mv['chunks_sent']} chunks; "
            f"{mv['chunks_held']} held there)",
            f"{format_bytes(mv['whole_kv_bytes'])} (the states' KV)",
            verdict(mv["ratio"], 0.10),
        ),
    ]
    for name, stats in (("swarm", swarm["cache"]), ("restart", restart["cache"])):
        store = stats.get("store") or {}
        table.append(
            (
                f"store after the {name}",
                f"{store.get('hits', 0)} hits, {store.get('tokens_saved', 0)} tokens saved",
                f"RAM {format_bytes(store.get('ram_bytes', 0))}, "
                f"disk {format_bytes(store.get('disk_bytes', 0))}",
                "" if stats.get("enabled") else "store disabled",
            )
        )
    return table


def main() -> None:
    """run_benchmark's command line, and this bench's own options before it."""
    parser = argparse.ArgumentParser(add_help=False, usage="python -m bench.kv [options]")
    parser.add_argument("--agents", type=int, default=AGENTS, help=f"default {AGENTS}")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"the first cold (default {ROUNDS})"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=PROMPT_TOKENS,
        help=f"each agent's system prompt (default {PROMPT_TOKENS})",
    )
    options, rest = parser.parse_known_args()
    if {"-h", "--help"} & set(rest):
        print(parser.format_help())
    sys.argv[1:] = rest
    bench: Callable[[int, int], Coroutine[Any, Any, dict[str, Any]]] = partial(run, options)
    run_benchmark(__doc__ or "", "kv", bench, rows, repeats=1)


if __name__ == "__main__":
    main()
