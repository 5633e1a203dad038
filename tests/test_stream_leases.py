"""A streamed completion whose client leaves before its first chunk gives its slot back.

Starlette sends a stream's headers, then iterates it, and stops as soon as the client
is gone: a client that leaves while the headers go out leaves the iterator unstarted, so
its ``finally`` (the lease, the engine request) never ran and the model's slot was held
for good (``runtime/server/owned_stream.py``). Driven here at the ASGI level, which makes
the race certain: the headers' ``send`` waits until the disconnect has been seen.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.app import create_app
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngine, FakeEngines
from tests.homes import isolated_paths
from tests.live_server import ServerFactory

MODEL = "smollm2-135m"


def _scope(path: str, body: bytes, extra: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn says
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def _leave_at_the_headers(
    app: Any, path: str, payload: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> list[str]:
    """POST ``payload``, then leave while the response's headers are being sent; the
    kinds of ASGI messages the app sent."""
    body = json.dumps(payload).encode()
    left = asyncio.Event()
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        left.set()
        return {"type": "http.disconnect"}

    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.start":
            await left.wait()  # the client is gone before the first chunk
            await asyncio.sleep(0.05)

    await app(_scope(path, body, list(headers)), receive, send)
    return sent


async def test_a_stream_left_before_its_first_chunk_frees_its_slot(pcrt_env: Paths) -> None:
    opener = FakeEngines(token_seconds=0.05)
    opener.enqueue(*["word "] * 200)  # 10 s of tokens if nobody stops it
    app = create_app(ServerSettings(parallel=1, context=512), opener=opener)
    async with app.router.lifespan_context(app):
        pool = app.state.services.pool
        payload = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "stream": True}
        sent = await _leave_at_the_headers(app, "/v1/completions", payload)
        assert sent == ["http.response.start"]  # not one chunk went out
        (model,) = pool.loaded()
        assert model.in_flight == 0  # the lease went back
        for _ in range(100):  # the engine stops within a token
            if model.engine.busy_slots == 0:
                break
            await asyncio.sleep(0.02)
        assert model.engine.busy_slots == 0
        rows = app.state.services.usage.rows()
        assert [row["status"] for row in rows] == [499]  # billed as a request the client cut


async def _until(done: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_forwarded_stream_left_before_its_first_chunk_closes_the_peers(
    tmp_path: Path, live_server: ServerFactory
) -> None:
    """The same on a request forwarded to a peer: the peer's stream is closed (the peer
    stops generating at once, not after its 10 s of tokens) and the request is billed
    as one the client cut short, on the peer."""
    model = "cloud-model"
    served = f'[models.{model}]\nsource = "{tmp_path / model}.gguf"\ncontext = 512\n'
    cloud_engines = FakeEngines(token_seconds=0.05)
    cloud_engines.enqueue(*["word "] * 200)
    cloud = live_server(ServerSettings(), models=served, opener=cloud_engines)
    peer = StaticPeer(name="cloud", url=cloud.url, kind="openai", strength=10)
    settings = ServerSettings(peers=PeerSettings(static=(peer,), health_interval=60))
    app = create_app(settings, registry=Registry.load(isolated_paths(tmp_path / "edge")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:

            async def in_rotation() -> bool:
                peers = (await client.get("/v1/pcrt/peers")).json()["peers"]
                return any(p["name"] == "cloud" and p["in_rotation"] for p in peers)

            deadline = time.monotonic() + 15
            while not await in_rotation():
                assert time.monotonic() < deadline, "the static peer never came up"
                await asyncio.sleep(0.05)
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 200,
            "stream": True,
        }
        complex_work = ((b"x-pc-complexity", b"high"),)
        sent = await _leave_at_the_headers(app, "/v1/chat/completions", payload, complex_work)
        assert sent == ["http.response.start"]
        (engine,) = cloud_engines.opened
        assert isinstance(engine, FakeEngine)
        assert await _until(lambda: engine.busy_slots == 0, 3.0), "the peer kept generating"
        rows = app.state.services.usage.rows()
        assert [(row["status"], row["ran_on"]) for row in rows] == [(499, "cloud")]
