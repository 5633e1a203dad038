"""sha256 of model files, cached in the store by (path, size, mtime).

Hashing a multi-gigabyte GGUF takes seconds to minutes; it is needed for verification and
for the KV-state compatibility key, so it is computed once per file version and reused
while the file's size and modification time stay the same.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pcrt.cache.store import Store
from pcrt.runtime.models.download import CHUNK

__all__ = ["file_sha256", "record_sha256"]

log = logging.getLogger(__name__)


def file_sha256(path: Path, store: Store | None) -> str:
    """The sha256 of ``path``, from the cache when its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    if store is not None:
        cached = store.get_file_hash(str(path), st.st_size, st.st_mtime_ns)
        if cached is not None:
            return cached
    log.info("computing sha256 of %s (%d bytes)", path, st.st_size)
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    after = path.stat()
    if store is not None and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        # only cache a hash of a file that did not change while it was read
        store.put_file_hash(str(path), st.st_size, st.st_mtime_ns, digest)
    return digest


def record_sha256(path: Path, store: Store | None, sha256: str) -> None:
    """Cache a digest computed elsewhere (a download hashes as it writes)."""
    if store is None:
        return
    path = Path(path).resolve()
    st = path.stat()
    store.put_file_hash(str(path), st.st_size, st.st_mtime_ns, sha256)
