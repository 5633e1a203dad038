"""The KV chunk store's tiers on their own (no model): bounds, LRU, pins, integrity, a
restart, clearing (issue 19)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from pcrt.cache.chunks import TAILS_PER_CHAIN, ChunkStore, is_chunk_key
from pcrt.cache.store import Store
from pcrt.runtime.server.settings import ServerSettings


def key(i: int) -> str:
    return hashlib.sha256(b"chunk %d" % i).hexdigest()


def data(i: int, size: int = 1000) -> bytes:
    return bytes([i % 251]) * size


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "pcrt.db")


def open_chunks(store: Store, tmp_path: Path, **kw: int) -> ChunkStore:
    kw.setdefault("ram_bytes", 10_000)
    kw.setdefault("disk_bytes", 100_000)
    return ChunkStore(store, tmp_path / "chunks", **kw)


def test_a_chain_is_held_from_its_first_key(store: Store, tmp_path: Path) -> None:
    with open_chunks(store, tmp_path) as chunks:
        for i in (0, 1, 3):
            chunks.put(key(i), data(i), 64)
        keys = [key(i) for i in range(4)]
        assert chunks.chain_length(keys) == 2  # the third is missing: the chain ends
        assert chunks.take_from_ram(keys) == [data(0), data(1)]
        assert chunks.read(keys) == [data(0), data(1)]
        assert is_chunk_key(key(0)) and not is_chunk_key("../etc")


def test_ram_keeps_its_bound_and_the_disk_keeps_the_rest(store: Store, tmp_path: Path) -> None:
    with open_chunks(store, tmp_path, ram_bytes=3_000) as chunks:
        for i in range(5):
            chunks.put(key(i), data(i), 64)
        chunks.flush()
        stats = chunks.stats()
        assert stats.ram_entries == 3 and stats.ram_bytes == 3_000  # the oldest two left
        assert stats.disk_entries == 5 and stats.disk_bytes == 5_000
        assert not chunks.in_ram([key(0)]) and chunks.in_ram([key(4)])
        # from the disk, checked, and back in RAM as the most recently used
        assert chunks.fetch([key(0), key(1)]).result() == [data(0), data(1)]
        assert chunks.in_ram([key(0), key(1)]) and not chunks.in_ram([key(2)])


def test_the_disk_evicts_least_recently_used_but_never_a_pinned_chunk(
    store: Store, tmp_path: Path
) -> None:
    with open_chunks(store, tmp_path, ram_bytes=0, disk_bytes=3_000) as chunks:
        chunks.put(key(0), data(0), 64)
        chunks.pin("run-1", [key(0)])
        for i in range(1, 5):
            chunks.put(key(i), data(i), 64)
            chunks.flush()
        # 0 is pinned; 1 and 2 were the least recently used of the rest
        held = {i for i in range(5) if chunks.chain_length([key(i)])}
        assert held == {0, 3, 4}
        assert chunks.stats().disk_bytes == 3_000 and chunks.stats().pinned == 1
        assert chunks.clear() == (2, 2_000)  # clearing keeps what a run needs
        assert chunks.read([key(0)]) == [data(0)]
        chunks.unpin("run-1")
        assert chunks.clear() == (1, 1_000)
        assert chunks.stats().disk_entries == 0
        assert not list((tmp_path / "chunks").glob("??/*"))


def test_the_disk_tier_survives_a_restart(store: Store, tmp_path: Path) -> None:
    with open_chunks(store, tmp_path) as chunks:
        chunks.put(key(0), data(0), 64)
        chunks.put(key(1), data(1), 64)
    with open_chunks(store, tmp_path) as again:  # a new process: RAM is empty
        assert again.stats().ram_entries == 0 and again.stats().disk_entries == 2
        assert again.chain_length([key(0), key(1)]) == 2
        assert not again.in_ram([key(0)])
        assert again.read([key(0), key(1)]) == [data(0), data(1)]


def test_a_chunk_whose_bytes_changed_is_refused_and_forgotten(store: Store, tmp_path: Path) -> None:
    with open_chunks(store, tmp_path) as chunks:
        for i in range(3):
            chunks.put(key(i), data(i), 64)
    path = tmp_path / "chunks" / key(1)[:2] / key(1)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with open_chunks(store, tmp_path) as again:
        keys = [key(i) for i in range(3)]
        assert again.read(keys) == [data(0)]  # the chain ends before the bad chunk
        assert again.stats().refused == 1
        assert again.chain_length(keys) == 1 and not path.exists()


def test_a_chunk_another_process_evicted_is_a_miss(store: Store, tmp_path: Path) -> None:
    with open_chunks(store, tmp_path) as chunks:
        chunks.put(key(0), data(0), 64)
    with open_chunks(store, tmp_path) as again:
        (tmp_path / "chunks" / key(0)[:2] / key(0)).unlink()
        assert again.read([key(0)]) == []
        assert again.chain_length([key(0)]) == 0


def test_the_first_writer_wins(store: Store, tmp_path: Path) -> None:
    with open_chunks(store, tmp_path) as chunks:
        chunks.put(key(0), data(0), 64)
        chunks.put(key(0), data(9), 64)  # another rounding of the same tokens
        assert chunks.read([key(0)]) == [data(0)]


def test_ram_only(tmp_path: Path) -> None:
    with ChunkStore(None, None, ram_bytes=2_000, disk_bytes=10**9) as chunks:
        assert chunks.disk_limit == 0
        for i in range(3):
            chunks.put(key(i), data(i), 64)
        chunks.flush()
        assert chunks.stats().ram_entries == 2 and chunks.stats().disk_entries == 0
        assert chunks.chain_length([key(0)]) == 0  # gone: nowhere else to keep it


def test_tails_are_indexed_by_the_chain_they_end_and_survive_a_restart(
    store: Store, tmp_path: Path
) -> None:
    with open_chunks(store, tmp_path) as chunks:
        for i in range(TAILS_PER_CHAIN + 2):  # a chain keeps its most recent few
            chunks.put(key(100 + i), data(i, 100), 3, follows=(key(0), [i, i + 1, i + 2]))
        chunks.flush()
        tails = chunks.continuations_of(key(0))
        assert [k for k, _ in tails] == [key(100 + i) for i in range(2, TAILS_PER_CHAIN + 2)]
        assert tails[0][1] == (2, 3, 4) and chunks.continuations_of(key(1)) == []
        assert not chunks.holds(key(100)) and chunks.stats().disk_entries == TAILS_PER_CHAIN
    with open_chunks(store, tmp_path) as again:
        assert again.continuations_of(key(0)) == tails
        assert again.read([key(102)]) == [data(0 + 2, 100)]


def test_a_tail_gone_from_every_tier_leaves_the_index(tmp_path: Path) -> None:
    with ChunkStore(None, None, ram_bytes=250, disk_bytes=0) as chunks:
        chunks.put(key(100), data(0, 100), 3, follows=(key(0), [1, 2, 3]))
        chunks.put(key(101), data(1, 100), 3, follows=(key(0), [4, 5, 6]))
        chunks.put(key(102), data(2, 100), 3, follows=(key(1), [7, 8, 9]))  # evicts 100
        assert [k for k, _ in chunks.continuations_of(key(0))] == [key(101)]
        assert chunks.clear() == (2, 200)
        assert chunks.continuations_of(key(0)) == chunks.continuations_of(key(1)) == []


def test_what_a_killed_writer_left_is_swept_when_the_store_opens(
    store: Store, tmp_path: Path
) -> None:
    with open_chunks(store, tmp_path) as chunks:
        chunks.put(key(0), data(0), 64)
    folder = tmp_path / "chunks" / key(1)[:2]
    folder.mkdir(exist_ok=True)
    half = folder / f".{key(1)}.4242.7.tmp"  # write_atomically's, never renamed
    orphan = folder / key(1)  # renamed into place, never indexed
    fresh = folder / key(2)  # as orphaned, but a moment old: maybe being indexed now
    for path in (half, orphan, fresh):
        path.write_bytes(b"x" * 10)
    old = time.time() - 3600
    for path in (half, orphan):
        os.utime(path, (old, old))
    with open_chunks(store, tmp_path) as again:
        assert not half.exists() and not orphan.exists() and fresh.exists()
        assert again.read([key(0)]) == [data(0)]


def test_the_ram_tier_is_an_eighth_of_the_machine_up_to_2_gib_unless_set() -> None:
    gib = 1024**3
    assert ServerSettings().kv_ram_for(4 * gib) == gib // 2  # an edge box keeps its RAM
    assert ServerSettings().kv_ram_for(64 * gib) == 2 * gib
    assert ServerSettings(kv_ram_bytes=0).kv_ram_for(64 * gib) == 0
    assert ServerSettings(kv_ram_bytes=3 * gib).kv_ram_for(4 * gib) == 3 * gib
