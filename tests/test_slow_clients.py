"""30 slow clients for 60 s leave ``/health`` fast and free their slots (issue 16, "what
must hold").

Half of them send a request body one byte every 2 s, never finishing it; the other half
start a long streamed completion and read it one byte every 2 s, through a small receive
buffer, so the daemon's writes back up and its slots stay taken while they dawdle. All
of them leave after 60 s. Meanwhile ``/health`` is polled every 100 ms; afterwards every
slot, queue place and connection is free again and an ordinary request is answered.

The engine is the fake (``tests/fakes.py``): what is tested is the daemon's event loop
and its slot accounting, not generation. No model, but SLOW: this test takes about 70 s
by design (marked ``slow``; ``-m "not slow"`` leaves it out).
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngine, FakeEngines
from tests.live_server import ServerFactory

pytestmark = pytest.mark.slow

CLIENTS = 30
SECONDS = 60.0
BYTE_EVERY = 2.0  # seconds between two bytes a slow client sends or reads
PARALLEL = 4
MODEL = "smollm2-135m"


def _request(body: bytes, *, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n" + f"Content-Length: {length}\r\n\r\n".encode()
    )


def _slow_sender(port: int, stop: threading.Event, errors: list[str]) -> None:
    """Declares a body and sends it a byte at a time; leaves before it is complete."""
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 100}], "max_tokens": 2}
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(_request(body))
            for byte in body:
                if stop.wait(BYTE_EVERY):
                    return
                sock.sendall(bytes([byte]))
            errors.append("a slow sender finished its body within the test")
    except OSError as exc:
        errors.append(f"slow sender: {exc}")


def _slow_reader(port: int, stop: threading.Event, errors: list[str], got: list[bytes]) -> None:
    """Starts a long stream and reads it a byte at a time through a 4 KB buffer."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 100_000,
            "stream": True,
        }
    ).encode()
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(30)
            sock.connect(("127.0.0.1", port))
            sock.sendall(_request(body) + body)
            first = sock.recv(1)
            while not stop.wait(BYTE_EVERY):
                first += sock.recv(1)
            got.append(first)
    except OSError as exc:
        errors.append(f"slow reader: {exc}")


def test_thirty_slow_clients_for_a_minute(live_server: ServerFactory) -> None:
    opener = FakeEngines(token_seconds=0.002)
    settings = ServerSettings(parallel=PARALLEL, queue_size=2 * CLIENTS, context=200_000)
    live = live_server(settings, opener=opener)
    port = int(live.url.rsplit(":", 1)[1])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        warm = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=warm).status_code == 200
        engine: FakeEngine = opener.opened[0]
        stop = threading.Event()
        errors: list[str] = []
        got: list[bytes] = []
        clients = [
            threading.Thread(target=_slow_sender, args=(port, stop, errors), daemon=True)
            for _ in range(CLIENTS // 2)
        ] + [
            threading.Thread(target=_slow_reader, args=(port, stop, errors, got), daemon=True)
            for _ in range(CLIENTS - CLIENTS // 2)
        ]
        for client in clients:
            client.start()
        latencies: list[float] = []
        busy_seen = 0
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            busy_seen = max(busy_seen, engine.busy_slots)
            time.sleep(0.1)
        connections_during = len(live.server.server_state.connections)
        stop.set()
        for client in clients:
            client.join(timeout=30)
        assert not errors, errors
        # the readers got their stream's start, and held the slots while they dawdled
        assert len(got) == CLIENTS - CLIENTS // 2 and all(
            g.startswith(b"HTTP/1.1 200") for g in got
        )
        assert busy_seen == PARALLEL
        assert connections_during >= CLIENTS
        latencies.sort()
        p99 = latencies[int(0.99 * len(latencies))]
        # the goal is p99 <= 100 ms (bench.stall measures it); bounds here are loose
        # for a shared machine
        assert p99 < 1.0 and latencies[-1] < 3.0, (p99, latencies[-1])
        assert statistics.median(latencies) < 0.1

        # everything they held is free again, and an ordinary request is answered
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            idle = engine.busy_slots == 0 and engine.queue_depth == 0
            if idle and len(live.server.server_state.connections) <= 1:  # our own client
                break
            time.sleep(0.1)
        assert engine.busy_slots == 0 and engine.queue_depth == 0
        assert len(live.server.server_state.connections) <= 1
        t0 = time.perf_counter()
        reply = http.post("/v1/chat/completions", json=warm)
        assert reply.status_code == 200 and time.perf_counter() - t0 < 5
