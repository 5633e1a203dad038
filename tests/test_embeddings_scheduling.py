"""Embeddings share the engine fairly and stop when nobody waits (issue 16, item 5).

A request over ``max_embedding_inputs`` texts or ``max_embedding_tokens`` tokens is a 400
before any work (on a fake engine: the bound is the daemon's). On the real model: the
engine embeds one text per step between decode steps, so a stream running beside a long
embedding request keeps getting tokens; a client that leaves mid-request frees the engine
after the text under way; and closing the engine ends a job in flight with
``EngineClosed`` at once instead of after its last text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from pcrt.runtime.engine import Engine, EngineConfig
from pcrt.runtime.errors import EngineClosed
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2 Q4_1
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens


def texts(count: int, words: int = 200) -> list[str]:
    """``count`` distinct texts of about ``words`` tokens each."""
    return [f"{i}: " + "word " * words for i in range(count)]


def http(server: LiveServer, **timeouts: float) -> httpx.Client:
    timeout = httpx.Timeout(120, **timeouts)
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout
    )


# -- the bounds: the daemon's settings, on a fake engine ---------------------------------


@pytest.fixture
def bounded(live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(max_embedding_inputs=4, max_embedding_tokens=10, api_key=KEY)
    return live_server(settings, opener=FakeEngines())


def test_more_inputs_than_the_bound_is_a_400(bounded: LiveServer) -> None:
    with http(bounded) as client:
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": list("abcde")})
        assert response.status_code == 400, response.text
        assert "max_embedding_inputs" in response.json()["error"]["message"]
        ok = client.post("/v1/embeddings", json={"model": MODEL, "input": list("abcd")})
        assert ok.status_code == 200, ok.text


def test_more_tokens_than_the_bound_is_a_400(bounded: LiveServer) -> None:
    with http(bounded) as client:
        over = ["one two three four five six", "seven eight nine ten eleven"]  # 11 tokens
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": over})
        assert response.status_code == 400, response.text
        assert "split them" in response.json()["error"]["message"]
        ok = client.post("/v1/embeddings", json={"model": MODEL, "input": over[:1]})
        assert ok.status_code == 200, ok.text


# -- the real engine: one text per step ---------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=2, api_key=KEY)
    return module_live_server(settings)


def test_a_stream_gets_tokens_while_a_long_embedding_request_runs(server: LiveServer) -> None:
    """The embedding request goes over a raw socket, so the test can leave it (close the
    socket) once the stream is done, rather than wait for its last text."""
    body = json.dumps({"model": MODEL, "input": texts(60, words=100)}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    embedding_request = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    payload = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 4,
        "temperature": 0,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    with http(server) as client, socket.create_connection((host, int(port))) as embedding:
        client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        embedding.sendall(embedding_request)
        time.sleep(1.0)  # the embedding job is under way
        started = time.perf_counter()
        pieces = 0
        with client.stream("POST", "/v1/completions", json=payload) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    pieces += bool(json.loads(line[6:])["choices"][0]["text"])
        took = time.perf_counter() - started
        embedding.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            answered = embedding.recv(1)
            pytest.fail(f"the embeddings answered before the stream ended: {answered!r}")
    print(f"stream: {pieces} pieces in {took:.1f} s while 60 texts were being embedded")
    assert pieces >= 2


def test_a_client_that_leaves_mid_embeddings_frees_the_engine(server: LiveServer) -> None:
    """Measured against one text's time, which the machine's load sets: the request after
    the one that left waits for the text under way and its own, not for 200 more."""
    one = {"model": MODEL, "input": texts(1)}
    with http(server) as client:
        client.post("/v1/embeddings", json=one)
        started = time.perf_counter()
        client.post("/v1/embeddings", json=one)
        baseline = time.perf_counter() - started
    with http(server, read=1.5) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/embeddings", json={"model": MODEL, "input": texts(200)})
    started = time.perf_counter()
    with http(server) as client:
        response = client.post("/v1/embeddings", json=one)
    took = time.perf_counter() - started
    print(f"one text: {baseline:.2f} s; the request after the one that left: {took:.2f} s")
    assert response.status_code == 200, response.text
    assert took < 20 * baseline + 2  # waiting for the 200 would take some 200 times


async def test_close_during_embeddings_ends_them_promptly(default_model_path: Path) -> None:
    config = EngineConfig(parallel=1, context=512, n_threads=2)
    engine = Engine(default_model_path, model_sha256=SHA256, config=config, name=MODEL)
    try:
        started = time.perf_counter()
        await engine.embed(texts(1))
        baseline = time.perf_counter() - started
        job = asyncio.ensure_future(engine.embed(texts(200)))
        await asyncio.sleep(1.0)
        assert not job.done()
        started = time.perf_counter()
        await asyncio.to_thread(engine.close)
        took = time.perf_counter() - started
    finally:
        engine.close()
    print(f"one text: {baseline:.2f} s; close: {took:.2f} s")
    with pytest.raises(EngineClosed):
        await job
    assert took < 10 * baseline + 2  # the text under way, not the 200
