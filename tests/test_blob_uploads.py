"""KV state uploads stream to disk: receiving a state costs a chunk of memory, not its size.

Both doors: ``PUT /v1/states`` (a user's upload) and ``PUT /v1/pcrt/blobs`` (a peer moving
a run here), whose cluster signature covers the blob's declared sha256 so that the body
is never read whole to be checked. Memory is counted with tracemalloc (Python's own
allocations, in this process where the daemon runs): a count, not a timing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pcrt.cache.blobs import IncomingBlob
from pcrt.routing.auth import CLUSTER_HEADER, request_header
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

CLUSTER_KEY = "blob-upload-test-key"
KEY = CompatKey(model_sha256="ab" * 32, type_k="f16", type_v="f16", flash_attn=False)
SIZE = 32 * 1024 * 1024
LIMIT = 8 * 1024 * 1024  # before streaming: two copies of the body and more (> 64 MiB)


@pytest.fixture(scope="module")
def state_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    blob = KVState(KEY, [1, 2, 3], 4, os.urandom(SIZE), "smollm2-135m").to_bytes()
    path = tmp_path_factory.mktemp("upload") / "state.bin"
    path.write_bytes(blob)
    return path, hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(peers=PeerSettings(cluster_key=CLUSTER_KEY)))


def _chunks(path: Path, tamper_at: int | None = None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(65536):
            if tamper_at is not None and offset <= tamper_at < offset + len(chunk):
                i = tamper_at - offset
                chunk = chunk[:i] + bytes([chunk[i] ^ 1]) + chunk[i + 1 :]
            offset += len(chunk)
            yield chunk


def _peak(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    tracemalloc.start()
    try:
        response = call()
        return response, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _leftovers(server: LiveServer) -> list[Path]:
    return list(server.services.blobs.root.glob(".incoming.*"))


def test_a_users_upload_and_download_stream_through_disk(
    server: LiveServer, state_file: tuple[Path, str]
) -> None:
    path, sha = state_file
    put, peak = _peak(
        lambda: httpx.put(server.url + "/v1/states", content=_chunks(path), timeout=120)
    )
    assert put.status_code == 201, put.text
    assert put.json()["id"] == sha and put.json()["size"] == path.stat().st_size
    assert peak < LIMIT, f"{peak / 2**20:.1f} MiB of Python memory to receive 32 MiB"
    assert server.services.blobs.get(sha) == path.read_bytes()
    # and back: sent from a map of the file a piece at a time, never whole in memory

    def download() -> httpx.Response:
        digest = hashlib.sha256()
        with httpx.stream("GET", f"{server.url}/v1/states/{sha}", timeout=120) as response:
            for piece in response.iter_bytes():
                digest.update(piece)
        assert digest.hexdigest() == sha
        return response

    got, peak = _peak(download)
    assert got.status_code == 200 and got.headers["content-length"] == str(path.stat().st_size)
    assert got.headers["x-pcrt-state-tokens"] == "3"
    assert peak < LIMIT, f"{peak / 2**20:.1f} MiB of Python memory to send 32 MiB"
    # a state broken in its payload is refused and leaves nothing behind
    broken = httpx.put(server.url + "/v1/states", content=_chunks(path, SIZE // 2), timeout=120)
    assert broken.status_code == 409 and "sha256" in broken.json()["error"]["message"]
    assert _leftovers(server) == []


def _signed_put(
    server: LiveServer, target: str, *, body: bytes = b"", body_sha256: str | None = None
) -> dict[str, str]:
    authority = server.url.removeprefix("http://")
    header = request_header(
        CLUSTER_KEY, "PUT", target, authority=authority, body=body, body_sha256=body_sha256
    )
    return {CLUSTER_HEADER: header, "Content-Type": "application/octet-stream"}


def test_a_peers_blob_is_streamed_and_held_to_its_signed_sha256(
    server: LiveServer, state_file: tuple[Path, str]
) -> None:
    path, sha = state_file
    server.services.blobs.remove(sha)
    target = f"/v1/pcrt/blobs?run_id=moved&sha256={sha}"
    put, peak = _peak(
        lambda: httpx.put(
            server.url + target,
            content=_chunks(path),
            timeout=120,
            headers=_signed_put(server, target, body_sha256=sha),
        )
    )
    assert put.status_code == 200, put.text
    assert put.json() == {"id": sha, "size": path.stat().st_size}
    assert peak < LIMIT, f"{peak / 2**20:.1f} MiB of Python memory to receive 32 MiB"
    assert server.services.blobs.info(sha).run_id == "moved"

    # one byte changed on the way: the body is not what the signature covers
    server.services.blobs.remove(sha)
    changed = httpx.put(
        server.url + target,
        content=_chunks(path, 1000),
        timeout=120,
        headers=_signed_put(server, target, body_sha256=sha),
    )
    assert changed.status_code == 401 and "signed" in changed.json()["error"]["message"]
    assert not server.services.blobs.has(sha) and _leftovers(server) == []

    # a sender that declares no hash signs the body itself, which is read and checked whole
    plain = "/v1/pcrt/blobs?run_id=moved"
    data = path.read_bytes()
    old = httpx.put(
        server.url + plain, content=data, timeout=120, headers=_signed_put(server, plain, body=data)
    )
    assert old.status_code == 200 and old.json()["id"] == sha


def test_a_disk_that_refuses_the_write_is_a_507_and_leaves_nothing(
    server: LiveServer, state_file: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC cannot be made here without root mounts: the write fails as the OS fails it."""
    path, _ = state_file

    def full(self: IncomingBlob, piece: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(IncomingBlob, "write", full)
    put = httpx.put(server.url + "/v1/states", content=_chunks(path), timeout=120)
    assert put.status_code == 507, put.text
    error = put.json()["error"]
    assert error["code"] == "insufficient_storage" and "the disk is full" in error["message"]
    assert _leftovers(server) == []
