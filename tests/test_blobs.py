"""The content-addressed blob store: verified reads, atomic writes, bounded with LRU."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

from pcrt.cache.blobs import BlobCorrupt, BlobMissing, BlobStore
from pcrt.cache.store import Store


@pytest.fixture
def blobs(store: Store, tmp_path: Path) -> BlobStore:
    return BlobStore(store, tmp_path / "blobs")


def _run(store: Store, run_id: str, status: str) -> None:
    store.db["runs"].insert(
        {
            "id": run_id,
            "dag_path": "/dynamic/x",
            "spec": "{}",
            "inputs": "{}",
            "status": status,
            "created_at": "t",
            "updated_at": "t",
        }
    )


def test_roundtrip_is_content_addressed_and_idempotent(blobs: BlobStore) -> None:
    data = b"kv state bytes" * 1000
    sha = blobs.put(data, run_id="r1")
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.put(data) == sha  # same bytes, same blob
    assert blobs.get(sha) == data
    assert [b.sha256 for b in blobs.entries()] == [sha]
    assert blobs.info(sha).run_id == "r1" and blobs.info(sha).size == len(data)
    assert not list(blobs.root.rglob("*.tmp"))  # no temporary file left behind


def test_corrupt_and_missing_blobs_are_refused(blobs: BlobStore) -> None:
    sha = blobs.put(b"original")
    blobs.path_of(sha).write_bytes(b"tampered")
    for read in (blobs.get, blobs.map):
        with pytest.raises(BlobCorrupt):
            read(sha)
        with pytest.raises(BlobMissing):
            read("0" * 64)
        with pytest.raises(BlobMissing):
            read("../../etc/passwd")


def test_a_mapped_blob_is_private_to_the_reader(blobs: BlobStore) -> None:
    data = b"header.." + b"payload" * 1000
    sha = blobs.put(data)
    view = blobs.map(sha)
    assert bytes(view) == data and not view.readonly
    view[:8] = b"REWRITTN"  # what a KV import does to a mapped blob's spent header
    assert blobs.get(sha) == data  # the file, and every other reader, never sees it
    assert bytes(blobs.map(sha)) == data


def _anonymous_bytes() -> int:
    """This process's anonymous memory, from /proc/self/smaps_rollup (Linux)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous: line in smaps_rollup")


@pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs /proc/self/smaps_rollup"
)
def test_a_mapped_blob_stays_page_cache_until_written(blobs: BlobStore) -> None:
    # a private writable map must not copy the blob into anonymous memory up front
    # (MAP_POPULATE did: +100% of its size); writing the header copies only its page
    size = 32 << 20
    sha = blobs.put(os.urandom(size))
    before = _anonymous_bytes()
    view = blobs.map(sha)  # map() itself reads every page to check the hash
    assert hashlib.sha256(view).hexdigest() == sha
    view[:16] = b"\0" * 16  # what a KV import writes over the blob's header
    grown = _anonymous_bytes() - before
    assert grown < size // 4, f"anonymous memory grew {grown >> 20} MiB for a 32 MiB blob"
    view.release()


def test_eviction_is_lru_and_spares_unfinished_runs(store: Store, tmp_path: Path) -> None:
    _run(store, "done", "succeeded")
    _run(store, "live", "interrupted")
    blobs = BlobStore(store, tmp_path / "blobs", max_bytes=2500)
    pinned = blobs.put(b"p" * 1000, run_id="live")
    old = blobs.put(b"o" * 1000, run_id="done")
    blobs.get(pinned)  # touched: the most recently used would survive anyway
    new = blobs.put(b"n" * 1000, run_id="done")  # 3000 bytes > 2500: evict one
    assert not blobs.has(old) and blobs.has(pinned) and blobs.has(new)
    newest = blobs.put(b"x" * 2000)  # only evictable blobs go, pinned stays over budget
    assert blobs.has(pinned) and blobs.has(newest) and not blobs.has(new)


def test_a_state_an_unfinished_run_points_at_is_never_evicted(store: Store, tmp_path: Path) -> None:
    """A finished greedy re-run stores the same bytes and so re-owns the blob: the
    interrupted run's node still needs it."""
    _run(store, "live", "interrupted")
    _run(store, "done", "succeeded")
    blobs = BlobStore(store, tmp_path / "blobs", max_bytes=1500)
    same = blobs.put(b"s" * 1000, run_id="live")
    store.db["nodes"].insert(
        {
            "run_id": "live",
            "node_id": "a",
            "path": "/dynamic/x/a",
            "type": "llm",
            "status": "interrupted",
            "checkpoint_sha256": same,
        }
    )
    assert blobs.put(b"s" * 1000, run_id="done") == same
    assert blobs.info(same).run_id == "done"  # re-owned by the finished run
    blobs.put(b"z" * 1000, run_id="done")  # over budget
    assert blobs.has(same)


def test_a_state_sent_ahead_of_its_run_waits_for_the_record(store: Store, tmp_path: Path) -> None:
    blobs = BlobStore(store, tmp_path / "blobs", max_bytes=1500)
    ahead = blobs.put(b"a" * 1000, run_id="moving-here")  # no such run yet
    blobs.put(b"b" * 1000)
    assert blobs.has(ahead)


def test_an_upload_in_pieces_is_stored_as_put_would_store_it(blobs: BlobStore) -> None:
    pieces = [os.urandom(65536) for _ in range(5)] + [b"tail"]
    data = b"".join(pieces)
    with blobs.incoming() as blob:
        for piece in pieces:
            blob.write(piece)
        assert blob.sha256 == hashlib.sha256(data).hexdigest() and blob.size == len(data)
        assert bytes(blob.finish()) == data  # mapped for checking before it is kept
        sha = blob.commit(run_id="r1")
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.get(sha) == data and blobs.info(sha).run_id == "r1"
    with blobs.incoming() as again:  # the same bytes again: one blob, no leftover
        again.write(data)
        assert again.commit() == sha
    assert [b.sha256 for b in blobs.entries()] == [sha]
    assert not list(blobs.root.glob(".incoming.*"))


def test_an_upload_left_uncommitted_leaves_nothing(blobs: BlobStore) -> None:
    with pytest.raises(RuntimeError), blobs.incoming() as blob:
        blob.write(b"half a state")
        raise RuntimeError("the client went away")
    with blobs.incoming() as refused:
        refused.write(b"not what was signed")  # the caller decides not to keep it
    assert not list(blobs.root.glob(".incoming.*")) and blobs.entries() == []


def test_uploads_a_crashed_process_left_are_removed_on_open(store: Store, tmp_path: Path) -> None:
    """A file nobody holds is a crashed upload's; one being written holds a lock on it,
    which a store opened meanwhile (another process, another container) respects."""
    blobs = BlobStore(store, tmp_path / "blobs")
    abandoned = blobs.root / ".incoming.1.0123456789abcdef.tmp"  # pid 1: alive, but not it
    abandoned.write_bytes(b"half")
    young = blobs.root / ".incoming.1.fedcba9876543210.tmp"  # just created, not locked yet
    young.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    with blobs.incoming() as live:
        live.write(b"on its way")
        BlobStore(store, blobs.root)
        assert not abandoned.exists() and live.path.exists() and young.exists()
        live.commit()
    assert list(blobs.root.glob(".incoming.*")) == [young]


def test_a_superseded_blob_goes_unless_someone_else_may_want_it(
    store: Store, tmp_path: Path
) -> None:
    blobs = BlobStore(store, tmp_path / "blobs")
    _run(store, "r", "running")
    old, pointed, read, again = (
        blobs.put(f"checkpoint {i}".encode(), run_id="r") for i in range(4)
    )
    store.db["nodes"].insert(
        {
            "run_id": "r",
            "node_id": "n",
            "path": "/x/n",
            "type": "llm",
            "status": "running",
            "checkpoint_sha256": pointed,
        }
    )
    blobs.get(read)  # somebody read it since it was written
    blobs.put(b"checkpoint 3")  # somebody else wrote the same bytes
    assert blobs.drop_superseded(old)
    assert not blobs.has(old) and old not in {b.sha256 for b in blobs.entries()}
    for kept in (pointed, read, again):
        assert not blobs.drop_superseded(kept) and blobs.has(kept)
    assert not blobs.drop_superseded(old)  # gone already: nothing to do


def test_a_write_the_disk_refuses_leaves_no_partial_file(
    blobs: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        blobs.put(b"a state")
    assert [p for p in blobs.root.rglob("*") if p.is_file()] == [] and blobs.entries() == []
