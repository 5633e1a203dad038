"""``/v1/states`` over real HTTP with a state the real default model produced."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcrt.runtime.engine import EngineClient, GenerateRequest
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.errors import StateError
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

MODEL = "smollm2-135m"
LIMIT = 1024 * 1024  # a few-token state of the default model is about 250 KB
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=512, n_threads=1, state_upload_max_bytes=LIMIT)
    return module_live_server(settings)


@pytest.fixture(scope="module")
def engine(server: LiveServer) -> EngineClient:
    """The daemon's own engine for the default model (loaded by a first request)."""
    reply = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    loaded = server.services.pool.get_loaded(MODEL)
    assert loaded is not None
    return loaded.engine


@pytest.fixture(scope="module")
def state(engine: EngineClient) -> KVState:
    result = asyncio.run(
        engine.generate(
            GenerateRequest(prompt="The capital of France is", sampling=GREEDY, export_state=True)
        )
    )
    exported = result.choices[0].state
    assert exported is not None
    return exported


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def error_of(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def test_upload_list_download_and_resume(
    http: httpx.Client, engine: EngineClient, state: KVState
) -> None:
    blob = state.to_bytes()
    assert len(blob) < LIMIT
    put = http.put("/v1/states", params={"model": MODEL}, content=blob)
    assert put.status_code == 201, put.text
    state_id = put.json()["id"]
    assert state_id == hashlib.sha256(blob).hexdigest()
    assert put.headers["location"] == f"/v1/states/{state_id}"
    assert put.json()["tokens"] == len(state.tokens) and put.json()["model"] == MODEL
    assert http.put("/v1/states", content=blob).json()["id"] == state_id  # idempotent

    listed = {s["id"]: s for s in http.get("/v1/states").json()["data"]}
    entry = listed[state_id]
    assert entry["size"] == len(blob) and entry["kind"] == "kv-state"
    assert entry["tokens"] == len(state.tokens) and entry["model"] == MODEL
    assert entry["key"] == state.key.model_dump() and entry["run_id"] is None
    assert entry["created_at"] and entry["last_used_at"] and entry["error"] is None

    got = http.get(f"/v1/states/{state_id}")
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.content == blob
    assert json.loads(got.headers["x-pcrt-state-key"]) == state.key.model_dump()
    assert int(got.headers["x-pcrt-state-tokens"]) == len(state.tokens)

    # the downloaded bytes continue the sequence without recomputing it
    restored = KVState.from_bytes(got.content)
    resumed = asyncio.run(
        engine.generate(GenerateRequest(prompt=[], state=restored, sampling=GREEDY))
    )
    assert resumed.cached_tokens == len(state.tokens)


def test_corrupt_uploads_are_409(http: httpx.Client, state: KVState) -> None:
    flipped = bytearray(state.to_bytes())
    flipped[-10] ^= 0xFF
    error = error_of(http.put("/v1/states", content=bytes(flipped)), 409, "state_corrupt")
    assert "sha256" in error["message"]
    error_of(http.put("/v1/states", content=state.to_bytes()[:-7]), 409, "state_corrupt")
    error_of(http.put("/v1/states", content=b"garbage"), 409, "state_corrupt")
    error_of(http.put("/v1/states", content=b""), 400, "empty_body")
    ids = {s["id"] for s in http.get("/v1/states").json()["data"]}
    assert hashlib.sha256(bytes(flipped)).hexdigest() not in ids


def test_a_state_of_another_model_is_409(http: httpx.Client, state: KVState) -> None:
    other = KVState(
        key=state.key.model_copy(update={"model_sha256": "0" * 64}),
        tokens=state.tokens,
        next_token=state.next_token,
        payload=state.payload,
        model=MODEL,
    ).to_bytes()
    reply = http.put("/v1/states", params={"model": MODEL}, content=other)
    assert "model_sha256" in error_of(reply, 409, "incompatible_state")["message"]
    ids = {s["id"] for s in http.get("/v1/states").json()["data"]}
    assert hashlib.sha256(other).hexdigest() not in ids
    reply = http.put("/v1/states", params={"model": "no-such-model"}, content=state.to_bytes())
    error_of(reply, 404, "model_not_found")


def test_over_the_limit_by_content_length_is_413_before_the_body(server: LiveServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"PUT /v1/states HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {LIMIT + 1}\r\n\r\n"
        sock.sendall(head.encode())  # and no body: the answer must not wait for it
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413")
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "state_too_large"


def test_over_the_limit_while_streaming_is_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to check up front
        for _ in range(LIMIT // 65536):
            yield b"\0" * 65536
        yield b"\0"

    error = error_of(http.put("/v1/states", content=chunks()), 413, "state_too_large")
    assert str(LIMIT) in error["message"]


def test_unknown_ids_are_404(http: httpx.Client) -> None:
    for state_id in ("0" * 64, "not-a-sha"):
        error_of(http.get(f"/v1/states/{state_id}"), 404, "state_not_found")
        error_of(http.delete(f"/v1/states/{state_id}"), 404, "state_not_found")


def test_delete_and_a_blob_corrupted_on_disk(
    http: httpx.Client, server: LiveServer, state: KVState
) -> None:
    shorter = KVState(state.key, state.tokens[:-1], state.next_token, state.payload, MODEL)
    state_id = http.put("/v1/states", content=shorter.to_bytes()).json()["id"]
    path = server.services.blobs.path_of(state_id)
    path.write_bytes(path.read_bytes()[:-1] + b"?")  # the disk changed under the store
    error_of(http.get(f"/v1/states/{state_id}"), 409, "state_corrupt")

    deleted = http.delete(f"/v1/states/{state_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    error_of(http.get(f"/v1/states/{state_id}"), 404, "state_not_found")
    error_of(http.delete(f"/v1/states/{state_id}"), 404, "state_not_found")
    assert state_id not in {s["id"] for s in http.get("/v1/states").json()["data"]}


def test_read_header_reads_only_the_header(tmp_path: Path, state: KVState) -> None:
    blob = state.to_bytes()
    path = tmp_path / "s.pcrtkv"
    path.write_bytes(blob)
    for source in (blob, path):
        header = KVState.read_header(source)
        assert header.key == state.key and header.n_tokens == len(state.tokens)
        assert header.model == MODEL and header.payload_bytes == len(state.payload)
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF  # the payload is not hashed: a header read does not notice
    assert KVState.read_header(bytes(flipped)).n_tokens == len(state.tokens)
    path.write_bytes(blob[:-1])
    with pytest.raises(StateError, match="truncated"):
        KVState.read_header(path)
    with pytest.raises(StateError, match="not a pcrt KV state"):
        KVState.read_header(b"nope")
