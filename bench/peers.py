"""Peer benchmarks: forwarding overhead, discovery and death detection, migration.

    python -m bench.peers [--threads 2] [--repeats 2] [--out bench/results/peers.json]

Two ``pcrt serve --lan`` daemons run as separate processes on loopback, with mDNS pinned
to 127.0.0.1 and one cluster key: the edge and the peer. The client is this process.

1. Forwarding: the same request straight to the peer and through the edge (which
   forwards it, ``X-PC-Route: peer``), alternated: p50 added latency of a one-token
   completion (goal <= 2 ms) and streamed tokens/s ratio (goal >= 0.98). The one-token
   request carries the peer model's own jitter (about a millisecond of its ~17), so the
   edge's overhead is also measured alone: a third edge in front of a peer that answers
   at once (``bench.instant_peer``, a static peer in the edge's config), 3 rounds of 300
   requests each way: the median round is reported, and every round's figures beside it.
2. Discovery: from the peer's process start, and from its API answering, to routable on
   the edge (goal <= 2 s); from its SIGKILL to out of the edge's rotation (goal <= 5 s).
3. Migration: a run whose node holds a 2,000-token prompt moves mid-generation to the
   peer with its KV states, vs the same move without states (the peer recomputes the
   prompt): time from the move to the run finished there.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import run_benchmark
from bench.http import free_port
from pcrt.device.units import format_bytes
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry

MODEL = "smollm2-135m"
ROUNDS = 3  # edge overhead rounds; odd, so the median is one of them
PCRT = str(Path(sys.executable).with_name("pcrt"))


class Daemon:
    """``pcrt serve --lan`` in its own process and home."""

    def __init__(self, name: str, key: str, threads: int, home: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PCRT_HOME": str(home / name), "PCRT_CLUSTER_KEY": key}
        self.cmd = [
            PCRT,
            "serve",
            "--port",
            str(self.port),
            "--lan",
            "--interfaces",
            "127.0.0.1",
            "--name",
            name,
            "--threads",
            str(threads),
            "--ctx",
            "4096",
            "--log-level",
            "warning",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def wait_up(self) -> float:
        """Seconds from start to /health answering 200."""
        while time.monotonic() - self.started < 120:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def in_rotation(edge: Daemon, peer: str, client: httpx.Client) -> bool:
    return in_rotation_of(edge.url, peer, client)


def in_rotation_of(edge_url: str, peer: str, client: httpx.Client) -> bool:
    try:
        peers = client.get(edge_url + "/v1/pcrt/peers", timeout=2).json()["peers"]
    except (httpx.HTTPError, KeyError, ValueError):
        return False
    return any(p["name"] == peer and p["in_rotation"] for p in peers)


def wait_until(condition: Any, timeout: float, interval: float = 0.01) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic()
        time.sleep(interval)
    raise RuntimeError("condition not met in time")


def one_token(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    started = time.perf_counter()
    response = client.post(url + "/v1/chat/completions", json=body, headers=headers)
    response.raise_for_status()
    return time.perf_counter() - started


def stream_rate(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    """Tokens/s between the first and the last streamed token of 128."""
    prompt = "Write a long story about a lighthouse."
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 128,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    }
    stamps = []
    with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(": ", ":"):
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def forwarding(edge: Daemon, peer: Daemon, repeats: int) -> dict[str, Any]:
    direct_h = {"X-PC-Route": "local"}
    via_h = {"X-PC-Route": "peer"}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for _ in range(5):  # warm both paths: model loaded, connections open
            one_token(client, peer.url, direct_h)
            one_token(client, edge.url, via_h)
        direct, via = [], []
        for _ in range(40 * repeats):
            direct.append(one_token(client, peer.url, direct_h))
            via.append(one_token(client, edge.url, via_h))
        rates_direct, rates_via = [], []
        for _ in range(2 * repeats):
            rates_direct.append(stream_rate(client, peer.url, direct_h))
            rates_via.append(stream_rate(client, edge.url, via_h))
    p50_direct, p50_via = statistics.median(direct), statistics.median(via)
    return {
        "p50_direct_ms": p50_direct * 1000,
        "p50_via_edge_ms": p50_via * 1000,
        "added_ms": (p50_via - p50_direct) * 1000,
        "stream_direct_tps": statistics.median(rates_direct),
        "stream_via_edge_tps": statistics.median(rates_via),
        "stream_ratio": statistics.median(rates_via) / statistics.median(rates_direct),
    }


def edge_overhead(home: Path) -> dict[str, Any]:
    """p50 of a request straight to an instant peer and through an edge in front of it:
    the median of ``ROUNDS`` rounds by added latency (not the best, which hides the
    noise), with each round's p50s and added latency so the spread shows."""
    peer_port, edge_port = free_port(), free_port()
    peer_url, edge_url = f"http://127.0.0.1:{peer_port}", f"http://127.0.0.1:{edge_port}"
    (home / "overhead").mkdir()
    config = home / "overhead" / "config.toml"
    config.write_text(
        f'[[peers.static]]\nname = "instant"\nurl = "{peer_url}"\n'
        'kind = "openai"\nmodels = ["instant"]\n'
    )
    env = {**os.environ, "PCRT_HOME": str(home / "overhead")}
    peer = subprocess.Popen([sys.executable, "-m", "bench.instant_peer", str(peer_port)])
    edge = subprocess.Popen(
        [
            PCRT,
            "serve",
            "--port",
            str(edge_port),
            "--config",
            str(config),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    body = {"model": "instant", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    route = {"X-PC-Route": "peer"}
    try:
        with httpx.Client(timeout=10, trust_env=False) as client:

            def post(url: str) -> float:
                started = time.perf_counter()
                client.post(
                    url + "/v1/chat/completions", json=body, headers=route
                ).raise_for_status()
                return time.perf_counter() - started

            wait_until(lambda: in_rotation_of(edge_url, "instant", client), 60, 0.1)
            for _ in range(50):  # warm: connections open on both hops
                post(peer_url), post(edge_url)
            rounds = []
            for _ in range(ROUNDS):
                direct, via = [], []
                for _ in range(300):
                    direct.append(post(peer_url))
                    via.append(post(edge_url))
                rounds.append((statistics.median(direct), statistics.median(via)))
    finally:
        for proc in (edge, peer):
            proc.terminate()
            proc.wait(timeout=30)
    # the middle round by added latency: the median, as ROUNDS is odd; its own p50s are
    # reported so that via - direct is still the added figure
    direct_s, via_s = sorted(rounds, key=lambda r: r[1] - r[0])[len(rounds) // 2]
    return {
        "p50_direct_ms": direct_s * 1000,
        "p50_via_edge_ms": via_s * 1000,
        "added_ms": (via_s - direct_s) * 1000,
        "added_ms_rounds": [(v - d) * 1000 for d, v in rounds],
        "p50_direct_ms_rounds": [d * 1000 for d, _ in rounds],
        "p50_via_edge_ms_rounds": [v * 1000 for _, v in rounds],
    }


NOTE = "the lighthouse keeper logged the weather, the ships and the lamp."
LONG_PROMPT = " ".join(f"Note {i}: {NOTE}" for i in range(120))  # about 2,000 tokens


def migration_dag() -> dict[str, Any]:
    """A fresh first line each time: no slot on either daemon holds this prompt already."""
    prompt = f"Log {uuid.uuid4().hex}. {LONG_PROMPT}\nSummarise the notes at length."
    return {
        "dag": "/dynamic/bench-move",
        "nodes": {
            # route local: it starts on the edge; the move is the benchmark's to make
            "long": {
                "type": "llm",
                "prompt": prompt,
                "route": "local",
                "temperature": 0,
                "max_tokens": 64,
                "checkpoint_every": 32,
                "cache": False,
            },
        },
    }


def move_at_first_checkpoint(
    client: httpx.Client, edge_url: str, dag: dict[str, Any], move: dict[str, Any]
) -> tuple[str, dict[str, Any], float]:
    """Stream ``dag`` on the edge and move the run (``move``: the migrate body) at its
    first checkpoint: the run's id, the move's answer, and when the move was asked."""
    moved: dict[str, Any] = {}
    started = 0.0
    body = {"dag": dag, "stream": True}
    with client.stream("POST", edge_url + "/v1/dags", json=body) as response:
        run_id = response.headers["x-pcrt-run"]
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif kind == "checkpoint" and not moved:
                started = time.perf_counter()
                moved = client.post(f"{edge_url}/v1/dags/{run_id}/migrate", json=move).json()
                moved["call_s"] = time.perf_counter() - started
    if not moved:
        raise RuntimeError(f"run {run_id} never checkpointed on the edge")
    return run_id, moved, started


def finished_run(
    client: httpx.Client, url: str, run_id: str, interval: float, timeout: float = 300
) -> dict[str, Any]:
    """The run's view on the daemon at ``url`` once it has succeeded or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view: dict[str, Any] = client.get(f"{url}/v1/dags/{run_id}").json()
        if view.get("status") in ("succeeded", "failed"):
            return view
        time.sleep(interval)
    raise RuntimeError(f"{url} did not finish run {run_id}")


def move_once(edge: Daemon, peer: Daemon, states: bool) -> dict[str, Any]:
    with httpx.Client(timeout=300, trust_env=False) as client:
        move = {"to": peer.name, "states": states}
        run_id, moved, started = move_at_first_checkpoint(client, edge.url, migration_dag(), move)
        view = finished_run(client, peer.url, run_id, interval=0.02)
        done = time.perf_counter() - started
        node = view["nodes"][0]
        return {
            "states": states,
            "move_call_s": moved["call_s"],
            "to_finished_s": done,
            "bytes_sent": moved["bytes_sent"],
            "resumed": node["resumed_from_checkpoint"],
            "prompt_tokens": node["prompt_tokens"],
            "status": view["status"],
        }


async def run(threads: int, repeats: int) -> dict[str, Any]:
    registry = Registry.load()
    ensure_pulled(registry.resolve(MODEL), registry)
    key = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-peers-") as tmp:
        home = Path(tmp)
        edge = Daemon("bench-edge", key, threads, home)
        peer = Daemon("bench-peer", key, threads, home)
        edge.start()
        edge.wait_up()
        poll = httpx.Client(trust_env=False)  # one connection: polling must not load the CPU
        try:
            discovery: list[dict[str, float]] = []
            forward: dict[str, Any] = {}
            moves: list[dict[str, Any]] = []
            for i in range(repeats):
                peer.start()
                up = peer.wait_up()
                routable = wait_until(lambda: in_rotation(edge, peer.name, poll), 30)
                discovery.append(
                    {
                        "from_start_s": routable - peer.started,
                        "from_api_up_s": routable - peer.started - up,
                    }
                )
                if i == 0:  # the peer is up and routable: measure work through it
                    forward = forwarding(edge, peer, repeats)
                    moves = [move_once(edge, peer, states) for states in (True, False) * 2]
                killed = time.monotonic()
                peer.kill()
                out = wait_until(lambda: not in_rotation(edge, peer.name, poll), 30)
                discovery[-1]["death_to_out_s"] = out - killed
        finally:
            poll.close()
            peer.stop()
            edge.stop()
        overhead = edge_overhead(home)
    return {
        "forwarding": forward,
        "edge_overhead": overhead,
        "discovery": discovery,
        "migration": moves,
    }


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    f = results["forwarding"]
    o = results["edge_overhead"]
    d = results["discovery"]
    m = results["migration"]
    start = max(x["from_start_s"] for x in d)
    api = max(x["from_api_up_s"] for x in d)
    death = max(x["death_to_out_s"] for x in d)
    with_states = [x for x in m if x["states"]]
    without = [x for x in m if not x["states"]]
    moved = statistics.median(x["to_finished_s"] for x in with_states)
    recomputed = statistics.median(x["to_finished_s"] for x in without)
    call = statistics.median(x["move_call_s"] for x in with_states)
    sent = format_bytes(with_states[0]["bytes_sent"])
    return [
        (
            "forwarding: p50 one-token request",
            f"{f['p50_via_edge_ms']:.1f} ms via edge",
            f"{f['p50_direct_ms']:.1f} ms direct",
            f"+{f['added_ms']:.2f} ms (<= 2 ms)",
        ),
        (
            "forwarding: p50, instant peer",
            f"{o['p50_via_edge_ms']:.2f} ms via edge",
            f"{o['p50_direct_ms']:.2f} ms direct",
            f"+{o['added_ms']:.2f} ms (<= 2 ms)",
        ),
        (
            "forwarding: streamed tokens/s",
            f"{f['stream_via_edge_tps']:.1f}",
            f"{f['stream_direct_tps']:.1f}",
            f"{f['stream_ratio']:.3f} (>= 0.98)",
        ),
        ("discovery: API up to routable (worst)", f"{api:.2f} s", "-", "(<= 2 s)"),
        ("discovery: process start to routable", f"{start:.2f} s", "-", "(includes start-up)"),
        ("death (SIGKILL) to out of rotation", f"{death:.2f} s", "-", "(<= 5 s)"),
        (
            "migration: move + finish, with states",
            f"{moved:.2f} s ({sent}, call {call:.2f} s)",
            f"{recomputed:.2f} s recomputed",
            f"{moved / recomputed:.2f}",
        ),
    ]


if __name__ == "__main__":
    run_benchmark(__doc__ or "", "peers", run, rows)
