"""Content-addressed blob store for KV states: files named by their sha256.

A blob is written to a temporary file, fsynced and renamed into place, then indexed in
SQLite; so a blob that the index (or a node record) refers to is always complete, and
a crash at any instant leaves at worst an unreferenced temporary file. Reads verify the
hash: a blob whose bytes changed on disk is refused, never loaded.

The store has a size bound. Eviction removes the least recently used blobs that no
unfinished run needs; a blob pinned by a running or interrupted run is never evicted.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import mmap
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pcrt.cache.status import UNFINISHED_RUN_STATES
from pcrt.cache.store import Store, utc_now

__all__ = [
    "BlobCorrupt",
    "BlobInfo",
    "BlobMissing",
    "BlobStore",
    "IncomingBlob",
    "is_blob_id",
    "remove_abandoned_writes",
    "write_atomically",
]

_SHA = re.compile(r"^[0-9a-f]{64}$")
# runs that may still need their states: a cancelled run resumes, a migrating one moves
ARRIVAL_GRACE = datetime.timedelta(minutes=10)  # a state sent ahead of its run's record
UPLOAD_GRACE = 60.0  # seconds an unlocked upload file is left alone (between open and lock)


def is_blob_id(text: str) -> bool:
    """Whether ``text`` can name a blob: a lowercase hex sha256."""
    return _SHA.match(text) is not None


class BlobMissing(KeyError):
    """No blob with this hash (never stored, or evicted)."""


class BlobCorrupt(ValueError):
    """The blob's bytes no longer hash to its name."""


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int
    kind: str
    run_id: str | None
    created_at: str
    last_used_at: str


class BlobStore:
    def __init__(self, store: Store, root: Path, max_bytes: int | None = None) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = store.lock  # the sqlite connection is shared between threads
        self._remove_abandoned_writes()

    def path_of(self, sha256: str) -> Path:
        if not is_blob_id(sha256):
            raise BlobMissing(f"not a blob id: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, *, kind: str = "kv-state", run_id: str | None = None) -> str:
        """Store ``data`` (idempotent) and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()

        def write(path: Path) -> None:
            write_atomically(path, data, sync_dir=False)  # _adopt syncs the directory

        self._adopt(sha256, len(data), kind, run_id, write)
        return sha256

    def _remove_abandoned_writes(self) -> None:
        """Files a killed process left half-written: uploads (``.incoming.*.tmp``) and
        ``write_atomically``'s temporary files beside a blob (``ab/.SHA.PID.TID.tmp``, as
        big as the state)."""
        remove_abandoned_writes([*self.root.glob(".incoming.*.tmp"), *self.root.glob("??/.*.tmp")])

    def incoming(self) -> IncomingBlob:
        """A blob that arrives in pieces (an upload): written to disk as it comes, never
        held whole in memory. ``commit`` stores it under its hash, as ``put`` would."""
        return IncomingBlob(self)

    def _adopt(
        self,
        sha256: str,
        size: int,
        kind: str,
        run_id: str | None,
        place: Callable[[Path], None],
    ) -> bool:
        """Index a blob, first putting its file in place with ``place`` unless the same
        bytes are stored already (then: True). Finding it stored and indexing it are one
        step under the lock, so ``drop_superseded`` cannot remove the file in between."""
        path = self.path_of(sha256)
        with self._lock:
            stored = path.exists()
            if stored:
                self._upsert(sha256, size, kind, run_id)
        if not stored:
            path.parent.mkdir(parents=True, exist_ok=True)
            place(path)
            _fsync_dir(path.parent)
            with self._lock:
                self._upsert(sha256, size, kind, run_id)
        if self.max_bytes is not None:
            self.evict(keep=sha256)
        return stored

    def _upsert(self, sha256: str, size: int, kind: str, run_id: str | None) -> None:
        now = utc_now()
        self.store.db.execute(
            "insert into blobs (sha256, size, kind, run_id, created_at, last_used_at)"
            " values (?, ?, ?, ?, ?, ?) on conflict (sha256) do update set"
            " last_used_at = excluded.last_used_at,"
            " run_id = coalesce(excluded.run_id, blobs.run_id)",
            [sha256, size, kind, run_id, now, now],
        )

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified against its name."""
        path = self.path_of(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"no blob {sha256}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorrupt(f"blob {sha256} is corrupt: its bytes no longer match its hash")
        self._touch(sha256)
        return data

    def map(self, sha256: str) -> memoryview:
        """The blob as a private, writable memory map, verified against its name.

        No copy of tens of MB into fresh memory (page faults make that slower here than
        reading the file): the pages are the page cache's until written, and writes stay
        private to this process. The view keeps the map open as long as it is alive.
        """
        path = self.path_of(sha256)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:  # mmap cannot map an empty file
                    mapped: mmap.mmap | bytearray = bytearray()
                else:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    # Prefault every page read-only, in one call. Not MAP_POPULATE: on a
                    # private writable map it faults each page for write, i.e. copies the
                    # whole blob into anonymous memory; this way pages stay shared page
                    # cache and the later in-place header write copies one page.
                    if sys.platform == "linux":
                        try:  # MADV_POPULATE_READ (22): Linux >= 5.14, often not in mmap
                            mapped.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
                        except OSError:  # an older kernel: EINVAL
                            mapped.madvise(mmap.MADV_WILLNEED)
        except FileNotFoundError:
            raise BlobMissing(f"no blob {sha256}") from None
        view = memoryview(mapped)
        if hashlib.sha256(view).hexdigest() != sha256:
            raise BlobCorrupt(f"blob {sha256} is corrupt: its bytes no longer match its hash")
        self._touch(sha256)
        return view

    def _touch(self, sha256: str) -> None:
        with self._lock:
            self.store.db.execute(
                "update blobs set last_used_at = ? where sha256 = ?", [utc_now(), sha256]
            )

    def has(self, sha256: str) -> bool:
        try:
            return self.path_of(sha256).is_file()
        except BlobMissing:
            return False

    def info(self, sha256: str) -> BlobInfo:
        with self._lock:
            rows = list(self.store.db.query("select * from blobs where sha256 = ?", [sha256]))
        if not rows or not self.has(sha256):
            raise BlobMissing(f"no blob {sha256}")
        return BlobInfo(**rows[0])

    def entries(self, run_id: str | None = None) -> list[BlobInfo]:
        sql, params = "select * from blobs", []
        if run_id is not None:
            sql, params = sql + " where run_id = ?", [run_id]
        with self._lock:
            rows = list(self.store.db.query(sql + " order by created_at", params))
        return [BlobInfo(**row) for row in rows]

    def remove(self, sha256: str) -> bool:
        path = self.path_of(sha256)
        with self._lock:
            self.store.db.execute("delete from blobs where sha256 = ?", [sha256])
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def drop_superseded(self, sha256: str) -> bool:
        """Remove a blob its writer has replaced (a node's previous checkpoint), unless
        someone else may want it: a node record points at it, or it was put again or read
        since it was written (its last use is not its creation). True when removed.

        Without this a running node's checkpoints pile up: they belong to an unfinished
        run, which eviction never touches, so a long generation would keep every one."""
        with self._lock:
            removed = self.store.db.execute(
                "delete from blobs where sha256 = ? and last_used_at = created_at and not"
                " exists (select 1 from nodes where state_sha256 = ? or checkpoint_sha256 = ?)",
                [sha256, sha256, sha256],
            ).rowcount
            if removed:
                self.path_of(sha256).unlink(missing_ok=True)
        return bool(removed)

    def total_bytes(self) -> int:
        with self._lock:
            rows = list(self.store.db.query("select coalesce(sum(size), 0) as n from blobs"))
        return int(rows[0]["n"])

    def evict(self, keep: str | None = None) -> list[str]:
        """Drop least recently used evictable blobs until under ``max_bytes``; ``keep`` (the
        blob just written) is never the victim."""
        if self.max_bytes is None:
            return []
        total = self.total_bytes()
        if total <= self.max_bytes:
            return []
        marks = ", ".join("?" for _ in UNFINISHED_RUN_STATES)
        unfinished = list(UNFINISHED_RUN_STATES)
        # the owner alone is not enough: identical bytes (a greedy re-run) re-own a blob,
        # so no blob that a node of an unfinished run points at is evicted; and one sent
        # ahead of its run (a migration sends states first) waits a while for the record
        arriving = (datetime.datetime.now(datetime.UTC) - ARRIVAL_GRACE).isoformat()
        with self._lock:
            candidates = list(
                self.store.db.query(
                    "select b.sha256, b.size from blobs b left join runs r on r.id = b.run_id"
                    " where (b.run_id is null or (r.id is null and b.created_at < ?)"
                    f"        or r.status not in ({marks}))"
                    " and not exists (select 1 from nodes n join runs u on u.id = n.run_id"
                    f"     where u.status in ({marks})"
                    "      and (n.state_sha256 = b.sha256 or n.checkpoint_sha256 = b.sha256))"
                    " order by b.last_used_at",
                    [arriving, *unfinished, *unfinished],
                )
            )
        evicted = []
        for row in candidates:
            if total <= self.max_bytes:
                break
            if row["sha256"] == keep:
                continue
            self.remove(row["sha256"])
            total -= row["size"]
            evicted.append(row["sha256"])
        return evicted


class IncomingBlob:
    """An upload on its way into the store: each piece is appended to a temporary file and
    hashed as it arrives, so a state of gigabytes costs a chunk of memory, not its size.
    Use as a context manager: leaving it uncommitted (an error, a refusal) deletes the
    temporary file."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._hash = hashlib.sha256()
        self.size = 0
        self.path = blobs.root / f".incoming.{os.getpid()}.{os.urandom(8).hex()}.tmp"
        self._file = open(self.path, "w+b")  # noqa: SIM115 - closed by commit or discard
        # held while the file is open: the store's clean-up leaves locked files alone
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._map: mmap.mmap | None = None
        self._done = False

    def __enter__(self) -> IncomingBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.discard()

    def write(self, chunk: bytes) -> None:
        """Append one piece (about 1 MiB, from a worker thread: see runtime/api/uploads)."""
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        """The hash of what was written so far."""
        return self._hash.hexdigest()

    def finish(self) -> memoryview:
        """No more pieces: the file is flushed to disk and mapped read-only, so that its
        content can be checked (a KV state's header and payload hash) before ``commit``."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.size == 0:
            return memoryview(b"")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._map)

    def commit(self, *, kind: str = "kv-state", run_id: str | None = None) -> str:
        """Move the file into place under its hash and index it; its sha256."""
        sha256 = self.sha256
        self._close()
        if self._blobs._adopt(
            sha256, self.size, kind, run_id, lambda path: os.replace(self.path, path)
        ):
            self.path.unlink()  # the same bytes were stored already
        self._done = True
        return sha256

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)
        self._done = True

    def _close(self) -> None:
        if self._map is not None:
            # at once, or a refused upload's disk space waits for the GC; unless a view
            # of it is still alive (then the GC closes it)
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._file.close()


def remove_abandoned_writes(temporary: Iterable[Path]) -> None:
    """Remove the temporary files a killed process left half-written. A write in progress
    holds a lock on its file (whatever process or container it is in), so only a file
    nobody holds, and older than ``UPLOAD_GRACE``, is removed."""
    for tmp in temporary:
        try:
            if time.time() - tmp.stat().st_mtime < UPLOAD_GRACE:
                continue  # maybe created a moment ago and not locked yet
            with open(tmp, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink(missing_ok=True)
        except BlockingIOError:  # being written
            continue
        except FileNotFoundError:  # its writer finished meanwhile
            continue


def write_atomically(path: Path, data: bytes | memoryview, *, sync_dir: bool = True) -> None:
    """``data`` as the file ``path``, whole or not at all: a temporary file beside it,
    fsynced and renamed over it (removed if anything fails: a full disk must not keep a
    partial file), then the directory fsynced unless the caller does that itself."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a store opening meanwhile leaves it be
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
