"""What the routing unit tests share: the cluster key they sign with, the KV state key of
"this" node, a peer record as mDNS would give it, and a stub peer (a tiny Starlette app
under uvicorn on loopback) that echoes, fails, stalls and streams as a test asks, and
answers pcrt's peer routes with their results proven, unproven or changed on the way."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pcrt.routing.auth import CLUSTER_HEADER, PROOF_HEADER, request_header, response_proof
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.peers import Peer
from pcrt.routing.policy import NodeView
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.engine.state import CompatKey
from tests.live_server import free_port

__all__ = [
    "BAD_REQUEST",
    "HERE_KEY",
    "KEY",
    "MODEL_SHA",
    "STREAM_CHUNKS",
    "Proof",
    "StubServer",
    "mdns_peer",
]

KEY = "correct horse battery staple"
MODEL_SHA = "cd" * 32
HERE_KEY = CompatKey(model_sha256=MODEL_SHA, type_k="f16", type_v="f16", flash_attn=False)


def mdns_peer(
    name: str = "p",
    url: str = "http://10.0.0.9:11435",
    kind: Literal["pcrt", "vllm", "openai"] = "pcrt",
    **kw: Any,
) -> Peer:
    """A peer record as an mDNS sighting makes it (fields as a test sets them)."""
    return Peer(name=name, url=url, kind=kind, source="mdns", **kw)


STREAM_CHUNKS = (b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n")
BAD_REQUEST = {
    "error": {"message": "model 'nope' not found", "type": "invalid_request_error", "code": None}
}


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "body": (await request.body()).decode(),
            "cluster": request.headers.get(CLUSTER_HEADER),
            "authorization": request.headers.get("authorization"),
            "forwarded_by": request.headers.get("x-pc-forwarded-by"),
        }
    )


async def _bad(request: Request) -> JSONResponse:
    return JSONResponse(BAD_REQUEST, status_code=400)


async def _busy(request: Request) -> JSONResponse:
    return JSONResponse({"detail": "queue full"}, status_code=503)


async def _boom(request: Request) -> Response:
    return PlainTextResponse("Internal Server Error", status_code=500)


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(1.0)
    return JSONResponse({})


async def _stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for chunk in STREAM_CHUNKS:
            yield chunk
            await asyncio.sleep(0.01)  # separate writes on the wire

    return StreamingResponse(body(), media_type="text/event-stream")


async def _stream_dies(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.01)
        raise RuntimeError("the model crashed before its first token")
        yield b""  # unreachable; makes this an async generator

    return StreamingResponse(body(), media_type="text/event-stream")


# how the stub proves its answers on pcrt's peer routes: as a pcrt peer does ("signed"),
# not at all (a pcrt of an older version), or wrongly: the body changed after signing, a
# proof made with another key, a proof for another request (one captured elsewhere)
Proof = Literal["signed", "none", "altered", "other-key", "other-request"]


class StubServer:
    """The stub peer, served from a thread while the ``with`` block lasts. Under
    ``/v1/pcrt/`` it answers ``answers[path]`` (a blob upload: its id and size) proven as
    ``proof`` says, with the cluster key ``KEY``."""

    def __init__(self) -> None:
        self.proof: Proof = "signed"
        self.answers: dict[str, Any] = {}
        app = Starlette(
            routes=[
                Route("/v1/pcrt/{rest:path}", self._pcrt, methods=["GET", "POST", "PUT"]),
                Route("/echo", _echo, methods=["GET", "POST"]),
                Route("/bad", _bad, methods=["GET", "POST"]),
                Route("/busy", _busy, methods=["GET", "POST"]),
                Route("/boom", _boom, methods=["GET", "POST"]),
                Route("/slow", _slow, methods=["GET"]),
                Route("/stream", _stream, methods=["POST"]),
                Route("/stream-dies", _stream_dies, methods=["POST"]),
            ]
        )
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.server.run, name="routing-stub-peer")

    async def _pcrt(self, request: Request) -> Response:
        sent = await request.body()
        path = request.url.path
        if path in self.answers:
            answer = self.answers[path]
        else:  # a blob upload, acknowledged as pcrt does
            answer = {"id": request.query_params.get("sha256"), "size": len(sent)}
        body = json.dumps(answer).encode()
        header = request.headers.get(CLUSTER_HEADER) or ""
        headers = {}
        if self.proof == "other-request":
            header = request_header(KEY, request.method, path)
        if self.proof != "none":
            key = "another cluster" if self.proof == "other-key" else KEY
            headers[PROOF_HEADER] = response_proof(key, header, body)
        if self.proof == "altered":
            body = json.dumps({**answer, "changed": "on the way"}).encode()  # after signing
        return Response(body, media_type="application/json", headers=headers)

    def __enter__(self) -> StubServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def bare_coordinator(settings: PeerSettings, **seams: Any) -> Coordinator:
    """A coordinator with no local models, node ``n`` on port 1 of 127.0.0.1 (not
    started); ``seams``: ``forwarder=``, ``node_name=``... as ``Coordinator`` takes them."""
    options: dict[str, Any] = {
        "node_id": "n",
        "node_name": "n",
        "api_port": 1,
        "announce_address": "127.0.0.1",
        "local_view": lambda: NodeView(name="local", kind="local", models=()),
        "local_models": list,
        **seams,
    }
    return Coordinator(settings, **options)
