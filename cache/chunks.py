"""The KV chunk store: runs of KV cells by chain key, in RAM and on disk, shared by every
engine of the process (issue 19).

A chunk is the KV of C consecutive tokens of a sequence; its key (made by the engine,
``runtime.engine.chunk_cache``) chains the keys of every chunk before it, so equal keys
mean equal prefixes of equal models, on any machine. To this module keys are opaque hex
and chunks opaque bytes.

Two tiers, one index:

- RAM: an LRU bounded in bytes. What a restore reads first, and where a chunk lands the
  moment a slot spills it.
- Disk: files under ``root`` (``ab/<key>``), written through by one writer thread (temp
  file, fsync, rename: never half a chunk), indexed in SQLite (``kv_chunks``), bounded in
  bytes, evicted least recently used first. It survives restarts.

Each chunk is indexed by the chain it follows, with its tokens (``continuations_of``), and
so is a tail: a sequence's end after its last full chunk (fewer than C tokens), kept like
a chunk. A prompt whose next tokens share the start of one restores that start too, as
llama-server restores a whole common prefix. A chain keeps its few most recent tails.

Chunks that an unfinished run needs are pinned (``kv_chunk_pins``, by the run's id) and
never evicted from disk, nor from RAM while the disk does not hold them yet. A pin lasts
while its run is unfinished (or not recorded yet: a migrated run's chunks arrive before
its record); a finished run's pins are dropped.

Every chunk on disk has its sha256 in the index and is checked when read: a chunk whose
bytes changed is refused, logged and forgotten, and the caller recomputes from there. A
restore never waits on the disk from the engine's scheduler thread: ``fetch`` reads in a
reader thread and answers with a future.

Several processes may share one directory (the daemon and a CLI command): each keeps its
own view of the index, so a chunk another process wrote is found after a restart and one
another process evicted is a miss, never an error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import mmap
import os
import queue
import re
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcrt.cache.blobs import UPLOAD_GRACE, remove_abandoned_writes, write_atomically
from pcrt.cache.status import UNFINISHED_RUN_STATES
from pcrt.cache.store import Store, utc_now

__all__ = ["TAILS_PER_CHAIN", "Chunk", "ChunkStats", "ChunkStore", "is_chunk_key"]

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[0-9a-f]{64}$")
TAILS_PER_CHAIN = 8  # a chain's tails kept: one per recent continuation of it


Chunk = bytes | memoryview
"""A chunk's bytes: as put, or a read-only map of its file."""


def _mapped(path: Path) -> Chunk:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap cannot map an empty file
            return b""
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if sys.platform == "linux":  # every page in one call (MADV_POPULATE_READ, Linux 5.14)
        with contextlib.suppress(OSError):
            mapped.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
    return memoryview(mapped)


def is_chunk_key(text: str) -> bool:
    """Whether ``text`` can name a chunk: a lowercase hex sha256."""
    return _KEY.match(text) is not None


@dataclass(frozen=True)
class ChunkStats:
    """The store's tiers and what they saved (counters since this process started)."""

    chunk_tokens: int
    ram_bytes: int
    ram_entries: int
    ram_limit: int
    disk_bytes: int
    disk_entries: int
    disk_limit: int
    pinned: int
    hits: int  # chunks restored instead of computed
    misses: int  # full chunks of prompts that no slot and no tier held
    tokens_saved: int  # prompt tokens restored from the store rather than computed
    bytes_restored: int
    refused: int  # chunks whose bytes did not match their hash

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def as_dict(self) -> dict[str, int | float]:
        """What ``/v1/pcrt/cache`` answers and ``pcrt cache`` shows."""
        return {**dataclasses.asdict(self), "hit_rate": round(self.hit_rate, 4)}


@dataclass
class _OnDisk:
    size: int
    sha256: str


class ChunkStore:
    """RAM and disk tiers of KV chunks. Thread-safe: engines' scheduler threads look up
    and put, a reader thread reads the disk, a writer thread writes it."""

    def __init__(
        self,
        store: Store | None,
        root: Path | None,
        *,
        ram_bytes: int,
        disk_bytes: int,
        chunk_tokens: int = 64,
    ) -> None:
        """``store`` and ``root`` None, or ``disk_bytes`` 0: RAM only (nothing survives)."""
        self.chunk_tokens = chunk_tokens
        self.ram_limit = ram_bytes
        self.disk_limit = disk_bytes if store is not None and root is not None else 0
        self._store = store
        self._root = root
        self._lock = threading.Lock()
        self._ram: OrderedDict[str, Chunk] = OrderedDict()
        self._ram_size = 0
        self._disk: dict[str, _OnDisk] = {}
        self._disk_size = 0
        self._pinned: set[str] = set()
        # parent chain key -> its tails' keys and tokens, oldest first; and back
        self._tails: dict[str, OrderedDict[str, tuple[int, ...]]] = {}
        self._tail_parent: dict[str, str] = {}
        self._counts = {"hits": 0, "misses": 0, "tokens_saved": 0, "bytes": 0, "refused": 0}
        # the writer thread's work, in order: chunks to write, LRU times to record
        self._writes: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._reader = concurrent.futures.ThreadPoolExecutor(1, "pcrt-chunk-reader")
        self._checkers = concurrent.futures.ThreadPoolExecutor(2, "pcrt-chunk-check")
        self._closed = False
        if self.disk_limit:
            assert root is not None
            root.mkdir(parents=True, exist_ok=True)
            self._load_index()
            self._sweep()
        self._writer = threading.Thread(
            target=self._write_forever, name="pcrt-chunk-writer", daemon=True
        )
        self._writer.start()

    # -- lookups (any thread; no I/O) -------------------------------------------------

    def chain_length(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, some tier holds."""
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._ram and key not in self._disk:
                    return i
        return len(keys)

    def holds(self, key: str) -> bool:
        """Whether some tier holds ``key``."""
        with self._lock:
            return key in self._ram or key in self._disk

    def on_disk(self, key: str) -> bool:
        """Whether the disk tier holds ``key`` (with no disk tier: whether RAM does)."""
        with self._lock:
            return key in self._disk if self.disk_limit else key in self._ram

    def in_ram(self, keys: Iterable[str]) -> bool:
        with self._lock:
            return all(key in self._ram for key in keys)

    def take_from_ram(self, keys: Sequence[str]) -> list[Chunk]:
        """The chunks of ``keys`` that RAM holds, from the first, stopping at one it does
        not (made most recently used)."""
        found = []
        with self._lock:
            for key in keys:
                data = self._ram.get(key)
                if data is None:
                    break
                self._ram.move_to_end(key)
                found.append(data)
        if found and self.disk_limit:
            touched = list(keys[: len(found)])
            self._writes.put(lambda: self._touch(touched))
        return found

    # -- reads that may touch the disk (the reader thread) ------------------------------

    def fetch(self, keys: Sequence[str]) -> concurrent.futures.Future[list[Chunk]]:
        """The chunks of ``keys``, from the first, read in the reader thread: the longest
        run it could read (a chunk missing or refused ends it)."""
        return self._reader.submit(self.read, list(keys))

    def read(self, keys: Sequence[str]) -> list[Chunk]:
        """``fetch``'s work, on the caller's thread (blocks on the disk)."""
        found = self.take_from_ram(keys)
        # checked two at a time: sha256 releases the GIL, and a chain's hashing is most
        # of a read from the page cache (1.7 GB/s here)
        for key, data in zip(
            keys[len(found) :], self._checkers.map(self._read_disk, keys[len(found) :]), strict=True
        ):
            if data is None:
                break
            self._remember(key, data)
            found.append(data)
        return found

    def _read_disk(self, key: str) -> Chunk | None:
        """The chunk's file, mapped (its pages the page cache's: a copy into fresh memory
        costs more in page faults than the read) and checked against its hash."""
        with self._lock:
            entry = self._disk.get(key)
        if entry is None or self._root is None:
            return None
        try:
            data = _mapped(self._path(key))
        except FileNotFoundError:  # another process evicted it
            self._forget(key)
            return None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            log.warning("KV chunk %s is corrupt on disk: refused, recomputed", key[:16])
            with self._lock:
                self._counts["refused"] += 1
            self._forget(key, unlink=True)
            return None
        return data

    # -- writes --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: Chunk,
        n_tokens: int,
        *,
        durable: bool = False,
        follows: tuple[str, Sequence[int]] | None = None,
    ) -> None:
        """Keep a chunk: in RAM now, on disk soon (the writer thread), or now with
        ``durable`` (a record is about to name it). ``follows``: the chain it follows
        and its tokens (fewer than a chunk's: a tail). A key already held keeps its
        bytes: the first writer wins (equal keys hold equal tokens' KV; two machines'
        may differ in rounding, and either is right)."""
        with self._lock:
            held = key in self._disk or (key in self._ram and not durable)
        if held:
            return
        tail = (follows[0], tuple(follows[1])) if follows is not None else None
        dropped = self._index(key, tail) if tail is not None else []
        self._remember(key, data)
        if durable and self.disk_limit:
            self._write(key, data, n_tokens, tail)
        elif self.disk_limit:
            self._writes.put(lambda: self._write(key, data, n_tokens, tail))
        for old in dropped:
            self._drop(old)

    def continuations_of(self, parent: str) -> list[tuple[str, tuple[int, ...]]]:
        """The chunks and tails held after chain key ``parent`` (or a root): (key,
        tokens) each."""
        with self._lock:
            return list(self._tails.get(parent, {}).items())

    def _index(self, key: str, follows: tuple[str, tuple[int, ...]]) -> list[str]:
        """Index a chunk or tail under the chain it follows; the chain's oldest tails
        beyond its few (to drop)."""
        parent, tokens = follows
        with self._lock:
            after = self._tails.setdefault(parent, OrderedDict())
            after[key] = tokens
            after.move_to_end(key)
            self._tail_parent[key] = parent
            tails = [k for k, t in after.items() if len(t) < self.chunk_tokens]
            dropped = tails[: max(0, len(tails) - TAILS_PER_CHAIN)]
            for old in dropped:
                self._unindex_tail(old)
            return dropped

    def _unindex_tail(self, key: str) -> None:
        """Forget a tail in the index (under the lock)."""
        parent = self._tail_parent.pop(key, None)
        if parent is not None:
            tails = self._tails.get(parent)
            if tails is not None:
                tails.pop(key, None)
                if not tails:
                    del self._tails[parent]

    def _drop(self, key: str) -> None:
        """Forget a chunk in both tiers (one another replaced)."""
        with self._lock:
            data = self._ram.pop(key, None)
            if data is not None:
                self._ram_size -= len(data)
        if self.disk_limit:  # after its own write, if that is still queued

            def forget() -> None:
                self._forget(key, unlink=True)

            self._writes.put(forget)

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the writer thread, after what is queued there: what a caller
        on a busy thread hands off (an engine cutting a spilled state into chunks)."""
        with self._lock:
            if self._closed:
                return
        self._writes.put(work)

    def flush(self) -> None:
        """Wait until everything put or deferred so far is done (tests, ``clear``)."""
        self._writes.join()

    def note_restore(self, chunks: int, tokens: int, size: int) -> None:
        with self._lock:
            self._counts["hits"] += chunks
            self._counts["tokens_saved"] += tokens
            self._counts["bytes"] += size

    def note_miss(self, chunks: int) -> None:
        with self._lock:
            self._counts["misses"] += chunks

    # -- pins ----------------------------------------------------------------------------

    def pin(self, run_id: str, keys: Iterable[str]) -> None:
        """Keep ``keys`` while run ``run_id`` is unfinished (its states name them)."""
        keys = list(keys)
        with self._lock:
            self._pinned.update(keys)
        if self._store is not None:
            with self._store.lock, self._store.db.conn:
                self._store.db.conn.executemany(
                    "insert or ignore into kv_chunk_pins (owner, key) values (?, ?)",
                    [(run_id, key) for key in keys],
                )

    def unpin(self, run_id: str) -> None:
        """Let go of a run's chunks before it finishes (its states were dropped)."""
        if self._store is None:
            return
        with self._store.lock, self._store.db.conn:
            self._store.db.execute("delete from kv_chunk_pins where owner = ?", [run_id])
        self._refresh_pins()

    def _refresh_pins(self) -> None:
        """Forget the pins of finished runs; hold the rest in memory."""
        assert self._store is not None
        marks = ", ".join("?" for _ in UNFINISHED_RUN_STATES)
        with self._store.lock, self._store.db.conn:
            self._store.db.execute(
                "delete from kv_chunk_pins where owner in"
                f" (select id from runs where status not in ({marks}))",
                list(UNFINISHED_RUN_STATES),
            )
            rows = self._store.db.execute("select distinct key from kv_chunk_pins").fetchall()
        with self._lock:
            self._pinned = {key for (key,) in rows}

    # -- the whole store -----------------------------------------------------------------

    def stats(self) -> ChunkStats:
        with self._lock:
            c = self._counts
            return ChunkStats(
                chunk_tokens=self.chunk_tokens,
                ram_bytes=self._ram_size,
                ram_entries=len(self._ram),
                ram_limit=self.ram_limit,
                disk_bytes=self._disk_size,
                disk_entries=len(self._disk),
                disk_limit=self.disk_limit,
                pinned=len(self._pinned),
                hits=c["hits"],
                misses=c["misses"],
                tokens_saved=c["tokens_saved"],
                bytes_restored=c["bytes"],
                refused=c["refused"],
            )

    def clear(self) -> tuple[int, int]:
        """Drop every chunk no unfinished run needs, from both tiers; (chunks, bytes)."""
        self.flush()
        if self._store is not None:
            self._refresh_pins()
        sizes: dict[str, int] = {}
        with self._lock:
            for key in [k for k in self._ram if k not in self._pinned]:
                data = self._ram.pop(key)
                self._ram_size -= len(data)
                sizes[key] = len(data)
                if key not in self._disk:
                    self._unindex_tail(key)
            on_disk = [k for k in self._disk if k not in self._pinned]
        for key in on_disk:
            sizes[key] = self._forget(key, unlink=True)
        return len(sizes), sum(sizes.values())

    def close(self) -> None:
        """Finish the writes under way (what was put is on disk), stop the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._writes.put(None)
        self._writer.join()
        self._reader.shutdown(wait=True)
        self._checkers.shutdown(wait=True)

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _remember(self, key: str, data: Chunk) -> None:
        """Into RAM as most recently used; the least recently used leave to make room
        (a pinned one only once the disk holds it)."""
        if len(data) > self.ram_limit:
            return
        with self._lock:
            if key in self._ram:
                self._ram.move_to_end(key)
                return
            self._ram[key] = data
            self._ram_size += len(data)
            if self._ram_size <= self.ram_limit:
                return
            for victim in list(self._ram):
                if self._ram_size <= self.ram_limit:
                    break
                if victim == key or (victim in self._pinned and victim not in self._disk):
                    continue
                self._ram_size -= len(self._ram.pop(victim))
                if victim not in self._disk:  # gone from every tier
                    self._unindex_tail(victim)

    def _path(self, key: str) -> Path:
        assert self._root is not None
        return self._root / key[:2] / key

    def _load_index(self) -> None:
        assert self._store is not None
        with self._store.lock:
            rows = self._store.db.execute(
                "select key, size, sha256, parent, tokens from kv_chunks order by last_used_at"
            ).fetchall()
        self._disk = {key: _OnDisk(size, sha) for key, size, sha, _, _ in rows}
        self._disk_size = sum(e.size for e in self._disk.values())
        for key, _, _, parent, raw in rows:
            if parent is not None and raw is not None:
                tokens = struct.unpack(f"<{len(raw) // 4}i", raw)
                self._tails.setdefault(parent, OrderedDict())[key] = tokens
                self._tail_parent[key] = parent
        self._refresh_pins()

    def _sweep(self) -> None:
        """What a killed process left: half-written files, and whole ones it renamed into
        place but died before indexing (a chunk no row names is never read again)."""
        assert self._root is not None
        remove_abandoned_writes(self._root.glob("??/.*.tmp"))
        now = time.time()
        for path in self._root.glob("??/[0-9a-f]*"):
            if path.name in self._disk:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= UPLOAD_GRACE:  # not one being indexed
                    path.unlink()

    def _write_forever(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                item()
            except Exception:  # a full disk: the chunk stays in RAM only
                log.exception("could not store a KV chunk")
            finally:
                self._writes.task_done()

    def _write(
        self, key: str, data: Chunk, n_tokens: int, tail: tuple[str, tuple[int, ...]] | None
    ) -> None:
        assert self._store is not None
        with self._lock:
            if key in self._disk:
                return
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        # a cache: the file is whole or absent (rename after fsync); the directory is not
        # synced, since a chunk lost in a power cut is only recomputed
        write_atomically(path, data, sync_dir=False)
        now = utc_now()
        with self._store.lock, self._store.db.conn:
            self._store.db.execute(
                "insert or replace into kv_chunks"
                " (key, sha256, size, n_tokens, created_at, last_used_at, parent, tokens)"
                " values (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    key,
                    sha256,
                    len(data),
                    n_tokens,
                    now,
                    now,
                    tail[0] if tail else None,
                    struct.pack(f"<{len(tail[1])}i", *tail[1]) if tail else None,
                ],
            )
        with self._lock:
            if key not in self._disk:  # the writer and a durable put may race to it
                self._disk[key] = _OnDisk(len(data), sha256)
                self._disk_size += len(data)
        self._evict_disk()

    def _evict_disk(self) -> None:
        assert self._store is not None
        with self._lock:
            if self._disk_size <= self.disk_limit:
                return
        self._refresh_pins()
        with self._store.lock:
            rows = self._store.db.execute(
                "select key from kv_chunks where key not in (select key from kv_chunk_pins)"
                " order by last_used_at"
            ).fetchall()
        for (key,) in rows:
            with self._lock:
                if self._disk_size <= self.disk_limit:
                    return
            self._forget(key, unlink=True)

    def _forget(self, key: str, *, unlink: bool = False) -> int:
        """Drop a chunk from the disk tier (and its file); the bytes it took."""
        with self._lock:
            entry = self._disk.pop(key, None)
            if entry is not None:
                self._disk_size -= entry.size
            if key not in self._ram:
                self._unindex_tail(key)
        if self._store is not None:
            with self._store.lock, self._store.db.conn:
                self._store.db.execute("delete from kv_chunks where key = ?", [key])
        if unlink and self._root is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))
        return entry.size if entry is not None else 0

    def _touch(self, keys: Sequence[str]) -> None:
        assert self._store is not None
        now = utc_now()
        with self._store.lock, self._store.db.conn:
            self._store.db.conn.executemany(
                "update kv_chunks set last_used_at = ? where key = ?", [(now, k) for k in keys]
            )
