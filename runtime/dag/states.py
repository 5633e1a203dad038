"""A node's KV states on disk: its final state (what a ``context`` child continues) and its
checkpoints (what a resume continues), stored blob first, record second.

A state is insurance: one the disk refuses is logged and done without, and one that is
missing, corrupt or saved by an incompatible engine is refused with a logged reason, so
that whatever needed it recomputes (slower, never wrong).
"""

from __future__ import annotations

import logging

from pcrt.cache.blobs import BlobCorrupt, BlobMissing, BlobStore
from pcrt.cache.runs import NodeCheckpointed, NodeRecord, RunStore
from pcrt.cache.status import NodeStatus
from pcrt.runtime.engine import EngineClient
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.errors import StateError
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["checkpoint_to_resume", "load_state", "save_checkpoint", "save_state"]

log = logging.getLogger(__name__)

# a node stopped in one of these may have generated past its last checkpoint
_RESUMABLE_NODE_STATES = (NodeStatus.INTERRUPTED, NodeStatus.RUNNING)


def save_state(blobs: BlobStore, state: KVState, run_id: str) -> str | None:
    """Serialise and store a state: in a worker thread, since hashing and joining tens of
    MB on the event loop would stall every other node's stream. None when the disk
    refuses it (full, read-only): a state is insurance, and losing it must not fail the
    generation it insures (whatever needed it recomputes instead)."""
    try:
        return blobs.put(state.to_bytes(), run_id=run_id)
    except OSError as exc:
        log.warning("run %s: a KV state could not be saved (%s); going on without it", run_id, exc)
        return None


def save_checkpoint(
    runs: RunStore, blobs: BlobStore, state: KVState, run_id: str, node_id: str, tokens: int
) -> bool:
    """The node's newest checkpoint replaces its previous one, on record and on disk;
    False when it could not be saved (the previous one stays). Blob and record in one
    worker thread: a run stopped meanwhile (timeout, cancel) still keeps this checkpoint
    on the node's record."""
    previous = runs.node(run_id, node_id).checkpoint_sha256
    sha = save_state(blobs, state, run_id)
    if sha is None:
        return False
    runs.update_node(run_id, node_id, NodeCheckpointed(sha, tokens))
    if previous is not None and previous != sha:
        blobs.drop_superseded(previous)
    return True


async def checkpoint_to_resume(
    blobs: BlobStore, record: NodeRecord, engine: EngineClient
) -> KVState | None:
    """The checkpoint a node stopped mid-generation continues from, if it has one that
    ``engine`` can use."""
    if record.status not in _RESUMABLE_NODE_STATES or not record.checkpoint_sha256:
        return None
    return await load_state(
        blobs, record.checkpoint_sha256, engine, f"checkpoint of {record.node_id}"
    )


async def load_state(
    blobs: BlobStore, sha: str | None, engine: EngineClient, what: str
) -> KVState | None:
    """A saved state, or None (with the reason logged) when it cannot be trusted."""
    if not sha:
        return None
    try:
        # tens of MB mapped and hashed: off the event loop, which streams other nodes.
        # The blob store checks the whole blob against its sha256 name; the map is
        # private, so the import frames the payload in place of the header
        state = await to_thread_to_completion(
            lambda: KVState.from_bytes(blobs.map(sha), verify=False, in_place=True)
        )
        state.check_compatible(engine.compat_key)
    except (BlobMissing, BlobCorrupt, StateError) as exc:
        log.warning("not using the %s (%s): recomputing instead", what, exc)
        return None
    return state
