"""kill -9 while a KV state is being written leaves a store that opens clean and work that
goes on (issue 16, "what must hold"; ARCHITECTURE.md: blobs before records).

Two writes a daemon makes, each caught in the act by a ``pcrt serve`` subprocess killed
with SIGKILL: a state upload (``PUT /v1/states``) part-way through its body, and a DAG
node's checkpoint while its temporary file is open. Afterwards the SQLite store passes its
integrity check, every indexed blob is whole, the interrupted upload's leftover is not
indexed and is cleared once it is old enough, and a new daemon takes the upload again or
resumes the run from its last whole checkpoint to the output of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pcrt.cache.blobs import BlobStore
from pcrt.cache.chunks import ChunkStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.paths import Paths
from tests.live_server import free_port

KEY = CompatKey(model_sha256="ab" * 32, type_k="f16", type_v="f16", flash_attn=False)


@contextmanager
def daemon(*flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``pcrt serve`` over this test's PCRT_HOME; killed if the test has not."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("pcrt")), "serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *flags, "--log-level", "warning"],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "pcrt serve did not start"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def check_store(paths: Paths) -> list[str]:
    """The store opens clean: SQLite's integrity check, every indexed blob whole, and
    every indexed KV chunk whole. Returns the indexed blob ids."""
    with Store(paths.db_path) as store:
        (row,) = store.db.execute("pragma integrity_check").fetchall()
        assert row[0] == "ok"
        blobs = BlobStore(store, paths.home / "blobs")
        ids = [info.sha256 for info in blobs.entries()]
        for sha256 in ids:
            assert hashlib.sha256(blobs.get(sha256)).hexdigest() == sha256
        chunks = store.db.execute("select key, sha256 from kv_chunks").fetchall()
        for key, sha256 in chunks:
            path = paths.home / "chunks" / key[:2] / key
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        return ids


def leftovers(paths: Paths) -> list[Path]:
    return sorted(
        [*(paths.home / "blobs").rglob(".*.tmp"), *(paths.home / "chunks").rglob(".*.tmp")]
    )


# -- an upload -----------------------------------------------------------------------------

BLOB = KVState(KEY, list(range(1, 65)), 65, os.urandom(24 << 20), model="smollm2-135m").to_bytes()


@pytest.mark.parametrize("sent", [1 << 20, len(BLOB) // 2, len(BLOB)])
def test_kill_9_during_an_upload(pcrt_env: Paths, sent: int) -> None:
    """Killed once the daemon has part of the body on disk (or, at ``len(BLOB)``, all of
    it: it may be checking or committing it). Either nothing is indexed, or the whole
    blob is; a new daemon takes the upload again."""
    with daemon() as (proc, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"PUT /v1/states HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/octet-stream\r\n"
                + f"Content-Length: {len(BLOB)}\r\n\r\n".encode()
                + BLOB[:sent]
            )
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size for p in leftovers(pcrt_env)):
                if sent == len(BLOB) and not leftovers(pcrt_env):
                    break  # the upload may be over already
                assert time.monotonic() < deadline, "the upload never reached the disk"
                time.sleep(0.005)
            kill_9(proc)
    stored = check_store(pcrt_env)
    sha256 = hashlib.sha256(BLOB).hexdigest()
    assert stored in ([], [sha256])
    left = leftovers(pcrt_env)
    assert sent == len(BLOB) or left, "killed before the upload reached its temporary file"
    # an upload nobody holds, old enough to be no one's: the store clears it on opening
    old = time.time() - 3600
    for path in left:
        os.utime(path, (old, old))
    check_store(pcrt_env)
    assert leftovers(pcrt_env) == []
    with daemon() as (_, url):
        reply = httpx.put(url + "/v1/states", content=BLOB, timeout=60)
        assert reply.status_code == 201 and reply.json()["id"] == sha256, reply.text
        assert httpx.get(url + f"/v1/states/{sha256}", timeout=60).content == BLOB
    assert check_store(pcrt_env) == [sha256]


# -- a checkpoint --------------------------------------------------------------------------

ESSAY = {
    "dag": "/dynamic/crash-essay",
    "nodes": {
        "intro": {
            "type": "llm",
            "tag": "simple",
            "prompt": "Name a sea creature.",
            "temperature": 0,
            "max_tokens": 12,
            "cache": False,
        },
        "essay": {
            "type": "llm",
            "tag": "simple",
            "temperature": 0,
            "max_tokens": 256,  # a checkpoint at each 64-token chunk boundary
            "prompt": "Write a very long essay about {{ nodes.intro.output }}.",
            "checkpoint_every": 8,
            "cache": False,
        },
    },
}
# one llama.cpp thread: the other core is for the test, which polls for the write
SERVE = ("--parallel", "2", "--ctx", "1024", "--threads", "1")


def _writing_a_checkpoint(pid: int, dirs: tuple[Path, ...]) -> bool:
    """Whether the daemon has a checkpoint's temporary file open (``write_atomically``:
    ``blobs/ab/.SHA.PID.TID.tmp``, or a KV chunk's ``chunks/ab/.KEY.PID.TID.tmp``, open
    from its first byte to its fsync)."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:
            continue
        if (
            target.startswith(tuple(map(str, dirs)))
            and target.endswith(".tmp")
            and "/.incoming." not in target
        ):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.usefixtures("default_model_path")
def test_kill_9_during_a_checkpoint_write(pcrt_env: Paths) -> None:
    with daemon(*SERVE) as (_, url):
        reference = httpx.post(url + "/v1/dags", json={"dag": ESSAY}, timeout=300).json()
        assert reference["status"] == "succeeded", reference["error"]
    # its chunks gone: the run below writes its own
    with (
        Store(pcrt_env.db_path) as store,
        ChunkStore(store, pcrt_env.home / "chunks", ram_bytes=0, disk_bytes=1 << 40) as kv,
    ):
        kv.clear()
    # a checkpoint writes the chunks it completed, then its blob of chunk keys
    written = (pcrt_env.home / "blobs", pcrt_env.home / "chunks")
    with daemon(*SERVE) as (proc, url):
        run_id = httpx.post(url + "/v1/dags", json={"dag": ESSAY, "wait": False}).json()["id"]
        deadline = time.monotonic() + 120
        while True:  # two checkpoints whole first, so the killed one has one to replace
            run = httpx.get(url + f"/v1/dags/{run_id}", timeout=10).json()
            if (run["nodes"][1]["checkpoint_tokens"] or 0) >= 16:
                break
            assert time.monotonic() < deadline and run["status"] == "running", run
            time.sleep(0.02)
        caught = False
        while time.monotonic() < deadline and proc.poll() is None:
            if _writing_a_checkpoint(proc.pid, written):
                kill_9(proc)
                caught = True
                break
        assert caught, "no checkpoint write was seen before the run ended"
    stored = check_store(pcrt_env)
    with Store(pcrt_env.db_path) as store:
        essay = RunStore(store).node(run_id, "essay")
    assert essay.checkpoint_sha256 in stored  # the record names a whole blob
    assert all(p.name.split(".")[1] not in stored for p in leftovers(pcrt_env))
    with daemon(*SERVE) as (_, url):
        assert httpx.get(url + f"/v1/dags/{run_id}", timeout=10).json()["status"] == "interrupted"
        done = httpx.post(url + f"/v1/dags/{run_id}/resume?wait=true", timeout=300).json()
    assert done["status"] == "succeeded", done["error"]
    assert done["nodes"][1]["resumed_from_checkpoint"]
    assert done["outputs"] == reference["outputs"]
    check_store(pcrt_env)


def test_a_checkpoint_write_killed_midway_leaves_nothing_once_the_store_reopens(
    pcrt_env: Paths,
) -> None:
    """What the kill above leaves (seen there: ``write_atomically``'s temporary file, as
    big as the state), aged as an upload's leftover must be before it is cleared."""
    sha256 = hashlib.sha256(b"a state").hexdigest()
    left = pcrt_env.home / "blobs" / sha256[:2] / f".{sha256}.4242.139999.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a state")
    old = time.time() - 3600
    os.utime(left, (old, old))
    assert check_store(pcrt_env) == []
    assert leftovers(pcrt_env) == []
