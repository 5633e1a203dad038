"""Stalls and memory under hostile requests (issue 16), against a live ``pcrt serve``.

    python -m bench.stall [--threads 2] [--timeout 120] [--examples 5] [--only NAME ...]
                          [--out bench/results/stall.json]

Each payload of issue 16 runs alone against a fresh daemon (``pcrt serve --api-key``, a
separate process on a free loopback port, the default model loaded and warm), while a
watcher process polls ``/health`` every 10 ms and samples the daemon's RSS:

- join bomb: a 260 KB DAG whose assert joins 40,000 empty strings with a 100,000-character
  separator (a "plain" template, rendered in the daemon's own process);
- ten indents: ten asserts of ``('a\\n' * 50000) | indent(99999)`` in one DAG (each waits
  for the template worker with a blocking call on the event loop);
- a 2 MB DAG of 1,000 chained nodes (parsed and checked, every template scanned, before
  the run starts) and a 12 MB grammar of 6,001 rules (its shape read character by
  character): both found after the issue, both on the loop once;
- 300 MB without the key, by Content-Length and chunked: how much the daemon reads before
  its answer;
- a 30 MB prompt (tokenized on the loop before the context check);
- 800 embedding inputs of 2,000 tokens; the client leaves after a few seconds, then a
  one-token completion asks whether the engine is free again;
- ``{"dag": "{x.JSON"}``: whether a DAG over HTTP is read as a file of the daemon's working
  directory (one that exists, one that does not);
- ``/openapi.json``, ``/docs``, ``/redoc`` without the key;
- a replayed peer signature: at once, and after 100,000 other signed requests;
- the schemathesis suite (PyPI, extra ``bench``) against the daemon's OpenAPI, with the
  key, a bounded number of examples per operation.

Per payload: the worst and the 99th percentile ``/health`` latency (goal: p99 <= 100 ms),
the daemon's RSS growth (goal: < 100 MB for a request under 1 MB; the daemon's own process,
its template worker shown apart), the payload's own answer, and how the daemon stopped
afterwards (SIGTERM, or killed when it ignored it; a daemon that died is said so). The
latencies are corrected for coordinated omission: a poll that waits blocks the polls due
after it, and each of those counts as late by what it would have waited. A payload whose
fix has not landed misses its goal: that is what the bench is for; each is bounded by
``--timeout`` so the run always finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from pcrt.routing.auth import CLUSTER_HEADER, request_header
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths

__all__ = ["PAYLOADS", "chained_dag", "main", "many_rules_grammar"]

POLL_SECONDS = 0.010  # /health every 10 ms
P99_GOAL_MS = 100.0
RSS_GOAL_MB = 100.0
SMALL_REQUEST = 1_000_000  # the RSS goal holds for requests under 1 MB
API_KEY = "bench-stall-" + "k" * 20
CLUSTER_KEY = "bench-stall-cluster-key"
MB = 1_000_000
HUGE_BODY = 300 * MB
REPLAY_FLOOD = 100_000  # the nonce cache's size today: a replay after this many passes
STOP_GRACE = 15.0  # seconds SIGTERM has before the daemon is killed
SUITE_TIMEOUT = 900.0  # the schemathesis suite: a few minutes, not one payload's bound


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the daemon ---------------------------------------------------------------------------


@dataclass
class Daemon:
    """``pcrt serve --api-key`` in its own process, working directory and home."""

    threads: int
    workdir: Path
    models_dir: Path
    model: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def start(self) -> None:
        """Start and warm up: the model loaded and one completion answered."""
        self.port = free_port()
        self.starts += 1
        home = self.workdir / "home"
        env = {
            **os.environ,
            "PCRT_HOME": str(home),
            "PCRT_MODELS_DIR": str(self.models_dir),
            "PCRT_MODELS_FILE": str(self.workdir / "no-models.toml"),
            "PCRT_CONFIG": str(self.workdir / "no-config.toml"),
            "PCRT_CLUSTER_KEY": CLUSTER_KEY,
        }
        env.pop("PCRT_API_KEY", None)
        cmd = [
            str(Path(sys.executable).with_name("pcrt")),
            "serve",
            "--port",
            str(self.port),
            "--api-key",
            API_KEY,
            "--threads",
            str(self.threads),
            "--parallel",
            "2",
            "--ctx",
            "2048",
            "--log-level",
            "warning",
        ]
        log = open(self.workdir / "daemon.log", "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pcrt serve exited with {self.proc.returncode}: see log")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            self.proc.kill()
            raise RuntimeError("pcrt serve did not start within 120 s")
        warm = self.complete(timeout=120)
        if warm != 200:
            raise RuntimeError(f"the warm-up completion answered {warm}")

    def complete(self, timeout: float) -> int | None:
        """A one-token completion: its status, None if it did not answer in time."""
        body = {"model": self.model, "prompt": "Hi", "max_tokens": 1}
        try:
            reply = httpx.post(
                self.url + "/v1/completions", json=body, headers=self.auth, timeout=timeout
            )
        except httpx.HTTPError:
            return None
        return reply.status_code

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def died(self) -> str | None:
        """How the daemon ended, if it did on its own."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        return f"died ({_signal_name(-code) if code < 0 else f'exit {code}'})"

    def stop(self) -> str:
        """SIGTERM, then SIGKILL after STOP_GRACE; how it went."""
        assert self.proc is not None
        died = self.died()
        if died is not None:
            return died
        self.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            self.proc.wait(STOP_GRACE)
            return f"SIGTERM: stopped in {time.monotonic() - start:.1f} s"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"SIGTERM ignored for {STOP_GRACE:g} s: killed"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- the watcher: /health every 10 ms and the daemon's RSS, in a process of its own -------


def _watch(port: int, pid: int, ready: Event, stop: Event, out: Connection) -> None:
    """Runs in the watcher process until ``stop``; sends what it saw to ``out``. Sets
    ``ready`` once its connection is open and the first RSS sample taken."""
    latencies: list[float] = []
    failures = 0
    rss: list[tuple[int, int]] = []  # (daemon, its children)
    done = threading.Event()

    def sample_rss() -> None:
        try:
            daemon = psutil.Process(pid)
        except psutil.Error:
            return
        while not done.is_set():
            try:
                own = daemon.memory_info().rss
                children = 0
                for child in daemon.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        children += child.memory_info().rss
                rss.append((own, children))
            except psutil.Error:
                return
            time.sleep(POLL_SECONDS)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    with contextlib.suppress(OSError, http.client.HTTPException):  # connect: not measured
        conn.request("GET", "/health")
        conn.getresponse().read()
    while not rss and sampler.is_alive():
        time.sleep(0.001)
    ready.set()
    due = time.perf_counter()
    while not stop.is_set():
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        try:
            conn.request("GET", "/health")
            reply = conn.getresponse()
            reply.read()
            ok = reply.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        answered = time.perf_counter()
        failures += not ok
        # the poll due at ``due`` and every poll due while it waited: each is late by what
        # it would have waited (no coordinated omission)
        while due <= answered:
            latencies.append(answered - due)
            due += POLL_SECONDS
        if not ok:
            time.sleep(POLL_SECONDS)
    done.set()
    sampler.join(timeout=5)
    conn.close()
    out.send({"latencies": latencies, "failures": failures, "rss": rss})


class Watch:
    """The watcher process around one payload."""

    def __init__(self, daemon: Daemon) -> None:
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._proc = context.Process(
            target=_watch, args=(daemon.port, daemon.pid, ready, self._stop, send), daemon=True
        )
        self._proc.start()
        send.close()
        self.result: dict[str, Any] | None = None
        if not ready.wait(60):
            self.abandon()
            raise RuntimeError("the watcher process did not start")

    def finish(self, timeout: float) -> bool:
        """Ask the watcher to stop; False while its last poll still waits on the daemon."""
        self._stop.set()
        if self.result is None and self._receive.poll(timeout):
            self.result = self._receive.recv()
            self._proc.join(5)
        return self.result is not None

    def abandon(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5)


def summarize(seen: dict[str, Any] | None) -> dict[str, Any]:
    if not seen or not seen["latencies"]:
        return {"polls": 0, "health_failures": 0}
    latencies = sorted(seen["latencies"])
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    rss = seen["rss"] or [(0, 0)]
    own_start, children_start = rss[0]
    return {
        "polls": len(latencies),
        "health_failures": seen["failures"],
        "health_worst_ms": 1000 * latencies[-1],
        "health_p99_ms": 1000 * p99,
        "health_median_ms": 1000 * statistics.median(latencies),
        "rss_start_mb": own_start / MB,
        "rss_growth_mb": (max(r[0] for r in rss) - own_start) / MB,
        "worker_rss_growth_mb": (max(r[1] for r in rss) - children_start) / MB,
    }


# -- payloads -----------------------------------------------------------------------------


@dataclass
class Answer:
    """A payload's own outcome: what the daemon answered, and whether that is the goal."""

    text: str
    as_goal: bool
    request_bytes: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Payload:
    name: str
    goal: str  # the answer the issue asks for
    run: Callable[[Daemon, float], Answer]
    timeout: float | None = None  # its own bound, over --timeout (a whole suite)


def _post_json(daemon: Daemon, path: str, body: Any, timeout: float) -> tuple[httpx.Response, int]:
    raw = json.dumps(body).encode()
    reply = httpx.post(
        daemon.url + path,
        content=raw,
        headers={**daemon.auth, "Content-Type": "application/json"},
        timeout=timeout,
    )
    return reply, len(raw)


def _run_outcome(reply: httpx.Response) -> str:
    """A DAG run's answer in a few words: its status code and run status, and why."""
    try:
        data = reply.json()
    except ValueError:
        return f"{reply.status_code}"
    if "status" in data:
        # "node 'a': assertion "..." could not evaluate: WHY": the why, shortened
        why = (data.get("error") or "").rsplit('"', 1)[-1].strip(" :")[:70]
        return f"{reply.status_code}, run {data['status']}" + (f" ({why})" if why else "")
    message = str((data.get("error") or {}).get("message", ""))[:70]
    return f"{reply.status_code}: {message}"


def join_bomb(daemon: Daemon, timeout: float) -> Answer:
    dag = {
        "dag": "/dynamic/join-bomb",
        "inputs": {"l": {"type": "array"}, "s": {"type": "string"}},
        "nodes": {"a": {"type": "assert", "that": "(inputs.l | join(inputs.s)) | length > 0"}},
    }
    body = {"dag": dag, "inputs": {"l": [""] * 40_000, "s": "x" * 100_000}}
    reply, size = _post_json(daemon, "/v1/dags", body, timeout)
    # the goal: the run refused or failed with a bound, not a 4 GB string built and measured
    as_goal = reply.status_code != 200 or reply.json().get("status") != "succeeded"
    return Answer(_run_outcome(reply), as_goal, size)


def ten_indents(daemon: Daemon, timeout: float) -> Answer:
    that = "(('a\\n' * 50000) | indent(99999)) | length > 0"
    nodes = {f"a{i}": {"type": "assert", "that": that} for i in range(10)}
    body = {"dag": {"dag": "/dynamic/ten-indents", "nodes": nodes}}
    reply, size = _post_json(daemon, "/v1/dags", body, timeout)
    return Answer(_run_outcome(reply), reply.status_code < 500, size)


def chained_dag(nodes: int = 1000, padding: int = 2000) -> dict[str, Any]:
    """A DAG of ``nodes`` chained one-token nodes, each prompt ``padding`` characters
    longer than it needs (1,000 and 2,000: 2 MB); the tests send the same one."""
    pad = "x" * padding
    chain = {
        f"n{i}": {
            "type": "llm",
            "prompt": (f"Go on: {{{{ nodes.n{i - 1}.output }}}} " if i else "Start. ") + pad,
            "max_tokens": 1,
        }
        for i in range(nodes)
    }
    return {"dag": "/dynamic/chained", "nodes": chain}


def many_rules_grammar(rules: int = 6000, width: int = 2000) -> str:
    """A GBNF grammar of ``rules`` + 1 chained rules, each with a ``width``-character
    string (6,000 and 2,000: 12 MB, refused for its rules once its shape is read)."""
    rule = 'r{i} ::= r{j} "' + "x" * width + '"\n'
    return "root ::= r0\n" + "".join(rule.format(i=i, j=i + 1) for i in range(rules))


def thousand_nodes(daemon: Daemon, timeout: float) -> Answer:
    """A 2 MB DAG of 1,000 chained nodes, each a 2,000-character prompt: parsing and
    checking it (every template scanned) took 1.3 s; the run itself is not awaited."""
    body = {"dag": chained_dag(), "wait": False}
    reply, size = _post_json(daemon, "/v1/dags", body, timeout)
    if reply.status_code == 202:
        run = reply.json()["id"]
        httpx.delete(f"{daemon.url}/v1/dags/{run}", headers=daemon.auth, timeout=timeout)
    return Answer(f"{reply.status_code}", reply.status_code == 202, size)


def big_grammar(daemon: Daemon, timeout: float) -> Answer:
    """A 12 MB grammar of 6,001 rules: its shape is read character by character (0.13 s
    per MB) before llama.cpp may parse it, and refused for its rules."""
    grammar = many_rules_grammar()
    body = {"model": daemon.model, "prompt": "Hi", "max_tokens": 1, "grammar": grammar}
    reply, size = _post_json(daemon, "/v1/completions", body, timeout)
    return Answer(f"{reply.status_code}", reply.status_code == 400, size)


def _huge_body(chunked: bool) -> Callable[[Daemon, float], Answer]:
    def run(daemon: Daemon, timeout: float) -> Answer:
        return _send_unauthorized(daemon, HUGE_BODY, chunked, timeout)

    return run


def _send_unauthorized(daemon: Daemon, total: int, chunked: bool, timeout: float) -> Answer:
    """POST ``total`` bytes of JSON without the key, a MiB at a time, over a raw socket:
    stop sending as soon as the daemon answers, and say how much it had by then."""
    head = b'{"model": "x", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    piece = b"a" * (1 << 20)
    framing = (
        b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n".encode()
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n" + framing + b"\r\n"
    )

    def body() -> Iterator[bytes]:
        left = total - len(head) - len(tail)
        yield head
        while left > 0:
            n = min(left, len(piece))
            yield piece[:n]
            left -= n
        yield tail

    sent = 0
    started = time.monotonic()
    deadline = started + timeout
    answered_at: int | None = None
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(request)
        try:
            for chunk in body():
                if select.select([sock], [], [], 0)[0]:  # the daemon answered (or closed)
                    answered_at = sent
                    break
                if time.monotonic() > deadline:
                    break
                framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                sock.sendall(framed)
                sent += len(chunk)
            else:
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (TimeoutError, OSError):  # it stopped reading: its answer should be there
            answered_at = sent
        status = _read_status(sock, max(1.0, deadline - time.monotonic()))
    if answered_at is None:
        answered_at = sent
    seconds = time.monotonic() - started
    if status is None:
        text = f"no answer after {sent / MB:.0f} MB sent, {seconds:.1f} s"
    else:
        text = f"{status} once {answered_at / MB:.0f} MB were sent, {seconds:.1f} s"
    # the goal: refused (401 or 413) before the body, i.e. before a few MB of it
    as_goal = status in (401, 413) and answered_at < 16 * MB
    return Answer(text, as_goal, total, {"status": status, "sent_before_answer": answered_at})


def _read_status(sock: socket.socket, timeout: float) -> int | None:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except OSError:
        pass
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def huge_prompt(daemon: Daemon, timeout: float) -> Answer:
    body = {"model": daemon.model, "prompt": "hello " * 5_000_000, "max_tokens": 1}
    reply, size = _post_json(daemon, "/v1/completions", body, timeout)
    code = reply.json().get("error", {}).get("code", "") if reply.status_code >= 400 else ""
    return Answer(f"{reply.status_code} {code}".strip(), reply.status_code in (400, 413), size)


EMBED_INPUTS = 800
EMBED_WORDS = 1_990  # " hello" is one token: about 2,000 tokens each, within the context
EMBED_LEAVE = 5.0  # seconds before the client gives up and leaves


def embeddings_then_leave(daemon: Daemon, timeout: float) -> Answer:
    texts = [f"{i}" + " hello" * EMBED_WORDS for i in range(EMBED_INPUTS)]
    raw = json.dumps({"model": daemon.model, "input": texts}).encode()
    headers = {**daemon.auth, "Content-Type": "application/json"}
    try:
        reply = httpx.post(
            daemon.url + "/v1/embeddings", content=raw, headers=headers, timeout=EMBED_LEAVE
        )
        left = f"answered {reply.status_code} within {EMBED_LEAVE:g} s"
    except httpx.TimeoutException:
        left = f"client left after {EMBED_LEAVE:g} s"
    # is the engine free for others once the client has gone?
    started = time.monotonic()
    status = daemon.complete(timeout=max(1.0, timeout - EMBED_LEAVE))
    waited = time.monotonic() - started
    if status is None:
        after = f"a 1-token completion had no answer in {waited:.0f} s"
    else:
        after = f"a 1-token completion answered {status} in {waited:.1f} s"
    return Answer(f"{left}; {after}", status == 200 and waited < 5, len(raw))


PROBE_DAG = {"dag": "/dynamic/probe", "nodes": {"a": {"type": "assert", "that": "true"}}}


def file_probe(daemon: Daemon, timeout: float) -> Answer:
    """A file that exists in the daemon's working directory, and one that does not."""
    (daemon.workdir / "{probe.JSON").write_text(json.dumps(PROBE_DAG), encoding="utf-8")
    there, size = _post_json(daemon, "/v1/dags", {"dag": "{probe.JSON"}, timeout)
    missing, _ = _post_json(daemon, "/v1/dags", {"dag": "{x.JSON"}, timeout)
    ran = there.status_code == 200
    errno = "No such file" in missing.text or "Errno" in missing.text
    text = (
        f"existing file: {there.status_code}{' (ran it)' if ran else ''}; "
        f"missing: {missing.status_code}{' (errno shown)' if errno else ''}"
    )
    as_goal = 400 <= there.status_code < 500 and not errno and 400 <= missing.status_code < 500
    return Answer(text, as_goal, size)


def docs_without_key(daemon: Daemon, timeout: float) -> Answer:
    codes = {
        path: httpx.get(daemon.url + path, timeout=timeout).status_code
        for path in ("/openapi.json", "/docs", "/redoc")
    }
    text = ", ".join(f"{path} {code}" for path, code in codes.items())
    return Answer(text, all(code in (401, 404) for code in codes.values()), 0)


def replayed_signature(daemon: Daemon, timeout: float) -> Answer:
    """One signed node-info request, replayed at once and again after REPLAY_FLOOD other
    signed requests (cheap ones: signed GET /health). It is stamped ahead of our clock
    by almost the allowed skew, so it stays valid for two skews while the flood runs."""
    authority = f"127.0.0.1:{daemon.port}"
    path = "/v1/pcrt/node"
    captured = request_header(CLUSTER_KEY, "GET", path, authority=authority, now=time.time() + 55)
    headers = {CLUSTER_HEADER: captured}
    first = httpx.get(daemon.url + path, headers=headers, timeout=timeout).status_code
    again = httpx.get(daemon.url + path, headers=headers, timeout=timeout).status_code
    started = time.monotonic()
    flood = asyncio.run(_signed_flood(daemon.port, REPLAY_FLOOD, timeout))
    flood_seconds = time.monotonic() - started
    late = httpx.get(daemon.url + path, headers=headers, timeout=timeout).status_code
    in_window = flood_seconds < 110  # the captured signature's stamp was still valid
    text = (
        f"first {first}, replayed {again}, replayed after {flood['sent']:,} signed "
        f"requests ({flood_seconds:.0f} s) {late}"
        + ("" if in_window else " (flood outlived the signature)")
    )
    as_goal = first == 200 and again == 401 and late == 401
    return Answer(text, as_goal, 0, {"flood": flood, "flood_seconds": flood_seconds})


async def _signed_flood(port: int, total: int, timeout: float) -> dict[str, Any]:
    """``total`` signed GET /health over a few keep-alive connections."""
    authority = f"127.0.0.1:{port}"
    url = f"http://{authority}/health"
    statuses: dict[int, int] = {}
    counter = iter(range(total))
    deadline = time.monotonic() + timeout

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in counter:
            if time.monotonic() > deadline:
                return
            header = request_header(CLUSTER_KEY, "GET", "/health", authority=authority)
            async with session.get(url, headers={CLUSTER_HEADER: header}) as reply:
                await reply.read()
                statuses[reply.status] = statuses.get(reply.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        await asyncio.gather(*(worker(session) for _ in range(8)))
    return {"sent": sum(statuses.values()), "statuses": statuses}


def schemathesis_suite(examples: int) -> Callable[[Daemon, float], Answer]:
    def run(daemon: Daemon, timeout: float) -> Answer:
        report = daemon.workdir / "schemathesis.json"
        st = Path(sys.executable).with_name("st")
        if not st.exists():
            return Answer("schemathesis missing: pip install -e '.[bench]'", False, 0)
        cmd = [
            str(st),
            "run",
            daemon.url + "/openapi.json",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--max-examples",
            str(examples),
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "1",
            "--request-timeout",
            "180",  # a completion without max_tokens generates to the end of its context
            "--seed",
            "16",
            "--no-shrink",
            "--checks",
            "not_a_server_error",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
        ]
        try:
            done = subprocess.run(  # in the work dir: its example database stays there
                cmd, capture_output=True, text=True, timeout=timeout, cwd=daemon.workdir
            )
        except subprocess.TimeoutExpired:
            return Answer(f"did not finish in {timeout:g} s", False, 0)
        cases, failures = _schemathesis_counts(report)
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        tally = next(
            (lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "Test cases:"),
            f"{cases} test cases",
        )
        text = f"{tally}; {failures} server errors"
        return Answer(text, failures == 0, 0, {"exit": done.returncode, "stdout": done.stdout})

    return run


def _schemathesis_counts(report: Path) -> tuple[int, int]:
    """Test cases run and server errors found, from the NDJSON events."""
    cases = failures = 0
    if not report.exists():
        return 0, 0
    for line in report.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            scenario = event.get("ScenarioFinished")
            if isinstance(scenario, dict):
                recorder = scenario.get("recorder", {})
                cases += len(recorder.get("cases", {}))
                for check_list in recorder.get("checks", {}).values():
                    failures += sum(c.get("status") == "FAILURE" for c in check_list)
    return cases, failures


def payloads(examples: int) -> list[Payload]:
    return [
        Payload("join bomb (260 KB DAG)", "refused, p99/RSS goals", join_bomb),
        Payload("ten indent asserts", "refused, p99/RSS goals", ten_indents),
        Payload("1,000-node DAG (2 MB)", "202, loop free", thousand_nodes),
        Payload("12 MB grammar", "400, loop free", big_grammar),
        Payload("300 MB no key, Content-Length", "401/413 before the body", _huge_body(False)),
        Payload("300 MB no key, chunked", "401/413 before the body", _huge_body(True)),
        Payload("30 MB prompt", "400/413, loop free", huge_prompt),
        Payload(
            "800 x 2,000-token embeddings, client leaves",
            "engine free once the client leaves",
            embeddings_then_leave,
        ),
        Payload('{"dag": "{x.JSON"} file probe', "4xx, no file read", file_probe),
        Payload("/openapi.json, /docs, /redoc, no key", "401", docs_without_key),
        Payload("replayed peer signature", "401 at once and after the flood", replayed_signature),
        Payload(
            f"schemathesis, {examples} examples/operation",
            "no 5xx",
            schemathesis_suite(examples),
            timeout=SUITE_TIMEOUT,
        ),
    ]


PAYLOADS = [p.name for p in payloads(5)]


# -- running ------------------------------------------------------------------------------


def run_payload(daemon: Daemon, payload: Payload, timeout: float) -> dict[str, Any]:
    """One payload against a fresh daemon, watched; the daemon is stopped after it."""
    timeout = payload.timeout or timeout
    row: dict[str, Any] = {"payload": payload.name, "goal": payload.goal}
    try:
        daemon.start()
    except RuntimeError as exc:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        text = f"the daemon did not start: {exc}"
        row.update(answer=text, answer_as_goal=False, request_bytes=0, details={})
        row.update(seconds=0.0, daemon="did not start", stopped="-", verdict="MISS: start")
        return row
    time.sleep(1.0)  # let the warm-up's allocations settle before the baseline
    watch = Watch(daemon)
    time.sleep(0.5)  # the watcher's first polls and samples: the baseline
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            outcome["answer"] = payload.run(daemon, timeout)
        except Exception as exc:  # the row says what the client saw
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:120]

    started = time.monotonic()
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 30)
    seconds = time.monotonic() - started
    time.sleep(0.3)  # a last few polls after the answer
    died = daemon.died()
    watched = watch.finish(timeout=5)
    stopped = daemon.stop()
    if not watched:
        watched = watch.finish(timeout=10)
    if not watched:
        watch.abandon()
    answer: Answer | None = outcome.get("answer")
    if answer is None:
        text = outcome.get("error") or f"no answer within {timeout + 30:g} s"
        answer = Answer(text, False, 0)
    row.update(
        answer=answer.text,
        answer_as_goal=answer.as_goal,
        request_bytes=answer.request_bytes,
        details=answer.details,
        seconds=seconds,
        daemon=died or "alive",
        stopped=stopped,
        **summarize(watch.result),
    )
    row["verdict"] = verdict(row)
    return row


def verdict(row: dict[str, Any]) -> str:
    misses = []
    if row.get("health_p99_ms", float("inf")) > P99_GOAL_MS:
        misses.append("p99")
    small = 0 < row["request_bytes"] < SMALL_REQUEST or row["request_bytes"] == 0
    if small and row.get("rss_growth_mb", float("inf")) >= RSS_GOAL_MB:
        misses.append("RSS")
    if not row["answer_as_goal"]:
        misses.append("answer")
    if row["daemon"] != "alive":
        misses.append("died")
    if "killed" in row["stopped"]:
        misses.append("SIGTERM")
    return "ok" if not misses else "MISS: " + ", ".join(misses)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    table: list[tuple[str, ...]] = []
    for r in results["payloads"]:
        health = f"{_ms(r.get('health_p99_ms'))} / {_ms(r.get('health_worst_ms'))} ms"
        if r.get("health_failures"):
            health += f" ({r['health_failures']} failed)"
        growth = r.get("rss_growth_mb")
        rss = "-" if growth is None else f"+{growth:,.0f} MB"
        daemon = r["stopped"] if r["daemon"] == "alive" else f"{r['daemon']}; restarted"
        table.append((r["payload"], health, rss, r["answer"], daemon, r["verdict"]))
    return table


HEADER = ("payload", "/health p99 / worst", "RSS growth", "answer", "daemon after", "goal")


def format_table(table: list[tuple[str, ...]]) -> str:
    """The other benches' table (``bench.common``), with this bench's columns."""
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(HEADER)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    dashes = tuple("-" * w for w in widths)
    return "\n".join([line(HEADER), line(dashes), *map(line, table)])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per payload")
    parser.add_argument("--examples", type=int, default=5, help="schemathesis, per operation")
    parser.add_argument("--only", action="append", default=[], help="payloads whose name has it")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stall.json"))
    args = parser.parse_args()

    registry = Registry.load()
    entry = registry.resolve(None)
    ensure_pulled(entry, registry)
    chosen = [
        p
        for p in payloads(args.examples)
        if not args.only or any(o.lower() in p.name.lower() for o in args.only)
    ]
    results: dict[str, Any] = {
        "model": entry.name,
        "threads": args.threads,
        "timeout_s": args.timeout,
        "goal": f"/health p99 <= {P99_GOAL_MS:g} ms; RSS < {RSS_GOAL_MB:g} MB under 1 MB",
        "payloads": [],
    }
    with tempfile.TemporaryDirectory(prefix="pcrt-stall-") as tmp:
        daemon = Daemon(args.threads, Path(tmp), Paths.from_env().models_dir, entry.name)
        for payload in chosen:
            print(f"... {payload.name}", file=sys.stderr, flush=True)
            row = run_payload(daemon, payload, args.timeout)
            results["payloads"].append(row)
            print(f"    {row['verdict']}: {row['answer']}", file=sys.stderr, flush=True)
    print(format_table(rows(results)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
