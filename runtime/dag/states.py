"""A node's KV states on disk: its final state (what a ``context`` child continues) and its
checkpoints (what a resume continues), stored blob first, record second.

With an engine that keeps states as chunks (``EngineClient.chunk_cache``), a state's blob
is a ``ChunkedState``: the keys of its full chunks, which go into the KV chunk store (on
disk before the blob is written) and are pinned there by the run, plus its tail. A
node's checkpoints then write each chunk once, a child's state shares its parent's
chunks, and a checkpoint keeps no tail at all (a resume computes those few tokens).

A state is insurance: one the disk refuses is logged and done without, and one that is
missing, corrupt or saved by an incompatible engine is refused with a logged reason, so
that whatever needed it recomputes (slower, never wrong). A chunked state whose chunks
were evicted gives back what is left of its chain, and the rest is computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pcrt.cache.blobs import BlobCorrupt, BlobMissing, BlobStore
from pcrt.cache.runs import NodeCheckpointed, NodeRecord, RunStore
from pcrt.cache.status import NodeStatus
from pcrt.runtime.engine import EngineClient
from pcrt.runtime.engine.chunk_cache import ChunkCache
from pcrt.runtime.engine.kv_chunks import KvLayoutError
from pcrt.runtime.engine.state import PORTABLE_LAYOUT, ChunkedState, KVState, is_chunked_blob
from pcrt.runtime.errors import StateError
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["Resume", "checkpoint_to_resume", "load_state", "save_checkpoint", "save_state"]

log = logging.getLogger(__name__)

# a node stopped in one of these may have generated past its last checkpoint
_RESUMABLE_NODE_STATES = (NodeStatus.INTERRUPTED, NodeStatus.RUNNING)


@dataclass(frozen=True)
class Resume:
    """Where a node continues: the KV it has back (None: none of it), and the tokens of
    the whole sequence so far, prompt and generated, the pending one last."""

    state: KVState | None
    tokens: list[int]

    @property
    def to_compute(self) -> list[int]:
        """The tokens after the state's: the prompt of the continuing request."""
        return self.tokens[len(self.state.continuation) if self.state else 0 :]


def save_state(
    blobs: BlobStore,
    state: KVState,
    run_id: str,
    chunks: ChunkCache | None = None,
    *,
    keep_tail: bool = True,
) -> str | None:
    """Serialise and store a state (as chunks when ``chunks`` can): in a worker thread,
    since hashing and joining tens of MB on the event loop would stall every other node's
    stream. None when the disk refuses it (full, read-only): a state is insurance, and
    losing it must not fail the generation it insures (whatever needed it recomputes)."""
    try:
        return blobs.put(_serialised(state, run_id, chunks, keep_tail), run_id=run_id)
    except OSError as exc:
        log.warning("run %s: a KV state could not be saved (%s); going on without it", run_id, exc)
        return None


def _serialised(state: KVState, run_id: str, chunks: ChunkCache | None, keep_tail: bool) -> bytes:
    if chunks is None or state.key.layout != PORTABLE_LAYOUT:
        return state.to_bytes()
    try:
        chunked = chunks.chunked(state, keep_tail=keep_tail)
    except (KvLayoutError, StateError) as exc:  # kept whole: slower to share, never wrong
        log.warning("run %s: a KV state kept whole, not as chunks: %s", run_id, exc)
        return state.to_bytes()
    chunks.store.pin(run_id, chunked.chunks)
    return chunked.to_bytes()


def save_checkpoint(
    runs: RunStore,
    blobs: BlobStore,
    state: KVState,
    run_id: str,
    node_id: str,
    tokens: int,
    chunks: ChunkCache | None = None,
) -> bool:
    """The node's newest checkpoint replaces its previous one, on record and on disk;
    False when it could not be saved (the previous one stays). Blob and record in one
    worker thread: a run stopped meanwhile (timeout, cancel) still keeps this checkpoint
    on the node's record. As chunks, a checkpoint writes only the chunks completed since
    the one before, and no tail."""
    previous = runs.node(run_id, node_id).checkpoint_sha256
    sha = save_state(blobs, state, run_id, chunks, keep_tail=False)
    if sha is None:
        return False
    runs.update_node(run_id, node_id, NodeCheckpointed(sha, tokens))
    if previous is not None and previous != sha:
        blobs.drop_superseded(previous)
    return True


async def checkpoint_to_resume(
    blobs: BlobStore, record: NodeRecord, engine: EngineClient
) -> Resume | None:
    """Where a node stopped mid-generation continues, if it has a checkpoint ``engine``
    can use."""
    if record.status not in _RESUMABLE_NODE_STATES or not record.checkpoint_sha256:
        return None
    return await _load(blobs, record.checkpoint_sha256, engine, f"checkpoint of {record.node_id}")


async def load_state(
    blobs: BlobStore, sha: str | None, engine: EngineClient, what: str
) -> KVState | None:
    """A saved state (or the start of it that its chunks still hold), or None (with the
    reason logged) when it cannot be trusted."""
    if not sha:
        return None
    resume = await _load(blobs, sha, engine, what)
    return resume.state if resume is not None else None


async def _load(blobs: BlobStore, sha: str, engine: EngineClient, what: str) -> Resume | None:
    try:
        # tens of MB mapped and hashed: off the event loop, which streams other nodes.
        # The blob store checks the whole blob against its sha256 name; the map is
        # private, so the import frames the payload in place of the header
        return await to_thread_to_completion(_read, blobs, sha, engine)
    except (BlobMissing, BlobCorrupt, StateError) as exc:
        log.warning("not using the %s (%s): recomputing instead", what, exc)
        return None


def _read(blobs: BlobStore, sha: str, engine: EngineClient) -> Resume:
    view = blobs.map(sha)
    if not is_chunked_blob(view):
        whole = KVState.from_bytes(view, verify=False, in_place=True)
        whole.check_compatible(engine.compat_key)
        return Resume(whole, whole.continuation)
    if engine.chunk_cache is None:
        raise StateError(f"it is kept as chunks, and {engine.name} keeps whole states")
    chunked = ChunkedState.from_bytes(view)
    state, rest = engine.chunk_cache.whole(chunked)  # reads the chunks: a worker's job
    if rest:
        log.info(
            "a state of %d tokens comes back with %d to compute", len(chunked.tokens), len(rest)
        )
    tokens = chunked.tokens + ([chunked.next_token] if chunked.next_token is not None else [])
    return Resume(state, tokens)
