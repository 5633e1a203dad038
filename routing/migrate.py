"""Moving a DAG run to a pcrt peer with its KV states, so the peer resumes, not recomputes.

The source side, step by step (the run is stopped first; its checkpoints are on disk):

1. the peer must be a trusted pcrt peer in the table;
2. every state the run references (finished nodes' states, in-flight checkpoints) is read
   and its compatibility key checked against what the peer's engine would use
   (``statekey.py``): a state for a model the peer lacks, or one its engine would refuse
   (another KV type, flash attention, layout or version), is left behind with the reason
   and that node recomputes there;
3. the states go first (``PUT /v1/pcrt/blobs``, hash-checked by the peer); a state kept
   as KV chunks goes as its small blob, after the chunks the peer says it lacks
   (``POST /v1/pcrt/chunks/missing``, then ``PUT /v1/pcrt/chunks`` each): a run whose
   context the peer already holds sends little more than its tail. The run record
   second (``POST /v1/pcrt/runs``): the peer never holds a record pointing at a missing
   blob, and a failure anywhere leaves the local run as it was, resumable here. A record
   POST whose connection failed or timed out is sent once more: the peer may have taken
   it and lost only the answer, and it answers a repeat of the same run as the first.
   Each acknowledgement must carry the peer's cluster proof over our request and its
   bytes, and name the state or run sent: an unproven or changed one fails the move;
4. the peer starts the run; the caller marks the local one migrated, with a pointer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pcrt.cache.async_runs import AsyncRunStore
from pcrt.cache.blobs import BlobCorrupt, BlobMissing, BlobStore
from pcrt.cache.chunks import ChunkStore
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.forward import PeerAnswer
from pcrt.routing.peers import Peer
from pcrt.routing.statekey import key_mismatches
from pcrt.runtime.engine.state import KVState, StateHeader
from pcrt.runtime.errors import InvalidRequest, PeerRejected, PeerUnavailable, StateError
from pcrt.runtime.threads import to_thread_to_completion

__all__ = [
    "BLOBS_PATH",
    "CHUNKS_PATH",
    "MISSING_CHUNKS_PATH",
    "RUNS_PATH",
    "Migration",
    "migrate_run",
    "refusal_of",
]

log = logging.getLogger(__name__)

BLOBS_PATH = "/v1/pcrt/blobs"
RUNS_PATH = "/v1/pcrt/runs"
CHUNKS_PATH = "/v1/pcrt/chunks"
MISSING_CHUNKS_PATH = "/v1/pcrt/chunks/missing"
RECORD_TIMEOUT = 30.0  # the peer stores a record and starts it: seconds, not minutes


@dataclass
class Migration:
    run_id: str
    peer: str
    peer_url: str
    states_sent: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0  # KV chunks the peer lacked (those it held did not travel)
    chunks_held: int = 0
    states_left: list[str] = field(default_factory=list)  # why each one stayed behind
    seconds: float = 0.0
    peer_status: str = ""

    @property
    def pointer(self) -> str:
        return f"{self.peer}:{self.peer_url}/v1/dags/{self.run_id}"

    def summary(self) -> dict[str, Any]:
        recompute = bool(self.states_left)
        return {
            "run_id": self.run_id,
            "peer": self.peer,
            "peer_url": self.peer_url,
            "migrated_to": self.pointer,
            "states_sent": self.states_sent,
            "bytes_sent": self.bytes_sent,
            "chunks_sent": self.chunks_sent,
            "chunks_held": self.chunks_held,
            "states_left": self.states_left,
            "with_states": self.states_sent > 0,
            "note": "some nodes recompute on the peer" if recompute else "states reused",
            "seconds": round(self.seconds, 3),
            "peer_status": self.peer_status,
        }


async def migrate_run(
    coordinator: Coordinator,
    runs: AsyncRunStore,
    blobs: BlobStore,
    run_id: str,
    peer_name: str,
    *,
    with_states: bool = True,
    chunks: ChunkStore | None = None,
) -> Migration:
    """Move the (stopped) run; ``with_states=False`` sends the record alone (the peer
    recomputes every unfinished node: what a move costs without pcrt's states).
    ``chunks``: where this node's chunked states keep their KV."""
    started = time.perf_counter()
    peer = coordinator.peer(peer_name)
    if peer is None or peer.kind != "pcrt":
        known = ", ".join(p.name for p in coordinator.table.all() if p.kind == "pcrt") or "none"
        raise InvalidRequest(f"no pcrt peer {peer_name!r} (pcrt peers: {known})")
    if not peer.trusted:
        raise InvalidRequest(f"peer {peer_name} is not trusted ({peer.trust_note})")
    record, nodes = await runs.run_with_nodes(run_id)
    result = Migration(run_id=run_id, peer=peer.name, peer_url=peer.url)
    sendable: set[str] = set()
    for sha in sorted({s for n in nodes for s in (n.state_sha256, n.checkpoint_sha256) if s}):
        try:
            # mapped and hashed, not read into memory: the file itself is what goes out
            header, size = await to_thread_to_completion(_verified_header, blobs, sha)
        except (BlobMissing, BlobCorrupt, StateError) as exc:
            result.states_left.append(f"{sha[:12]}: {exc}")
            continue
        if not with_states:
            result.states_left.append(f"{sha[:12]}: not sent (asked to move without states)")
            continue
        refusal = refusal_of(header, peer)
        if refusal is None and header.chunked:
            refusal = await _send_chunks(coordinator, peer, chunks, header, run_id, result)
        if refusal is not None:
            result.states_left.append(f"{sha[:12]}: {refusal}")
            continue
        try:
            # streamed from disk; the signature covers the blob's name, its sha256, and
            # the peer holds the body to it
            stored = await coordinator.forwarder.request(
                peer,
                "PUT",
                BLOBS_PATH + f"?run_id={run_id}&sha256={sha}",
                content=blobs.path_of(sha),
                content_sha256=sha,
                headers={"Content-Type": "application/octet-stream"},
                proven=True,
            )
        except FileNotFoundError:  # removed since (pcrt state rm): the peer recomputes
            result.states_left.append(f"{sha[:12]}: removed while the run moved")
            continue
        if _json_field(stored, "id") != sha:
            raise PeerUnavailable(
                f"peer {peer.name} did not acknowledge state {sha[:12]}", peer=peer.name
            )
        sendable.add(sha)
        result.states_sent += 1
        result.bytes_sent += size
    payload = {
        "run": {
            "id": record.id,
            "dag_path": record.dag_path,
            "spec": record.spec,
            "inputs": record.inputs,
            "tokens_used": record.tokens_used,
            "nodes_executed": record.nodes_executed,
            "created_at": record.created_at,
            "agent": record.agent,  # the peer bills the rest of the run to the same agent
        },
        "nodes": [
            {
                "node_id": n.node_id,
                "path": n.path,
                "type": n.type,
                "status": n.status,
                "output": n.output,
                "prompt_tokens": n.prompt_tokens,
                "cached_tokens": n.cached_tokens,
                "completion_tokens": n.completion_tokens,
                "started_at": n.started_at,
                "finished_at": n.finished_at,
                "seconds": n.seconds,
                "ran_on": n.ran_on if n.ran_on != "local" else coordinator.node_name,
                "model": n.model,
                "state_sha256": n.state_sha256 if n.state_sha256 in sendable else None,
                "checkpoint_sha256": n.checkpoint_sha256
                if n.checkpoint_sha256 in sendable
                else None,
                "checkpoint_tokens": n.checkpoint_tokens
                if n.checkpoint_sha256 in sendable
                else None,
            }
            for n in nodes
        ],
        # the peer knows a repeat of this move by it: the node id, unique where names
        # (hostnames) may not be
        "origin": coordinator.node_id,
    }
    answer = await _send_record(coordinator, peer, payload)
    if _json_field(answer, "id") != run_id:
        raise PeerUnavailable(f"peer {peer.name} did not take run {run_id}", peer=peer.name)
    result.peer_status = str(_json_field(answer, "status") or "")
    result.seconds = time.perf_counter() - started
    return result


async def _send_chunks(
    coordinator: Coordinator,
    peer: Peer,
    chunks: ChunkStore | None,
    header: StateHeader,
    run_id: str,
    result: Migration,
) -> str | None:
    """Send the chunks of a chunked state that the peer lacks, in chain order; why the
    state stays behind, or None. A chunk missing here ends what is sent: the peer then
    restores the chain up to it and computes the rest."""
    if chunks is None:
        return "it is kept as KV chunks, and this node has no chunk store"
    try:
        answer = await coordinator.forwarder.request(
            peer,
            "POST",
            MISSING_CHUNKS_PATH,
            json_body={"keys": list(header.chunks), "chunk_tokens": header.chunk_tokens},
            proven=True,
        )
    except PeerRejected as exc:  # a peer without a chunk store, or of another chunk size
        return f"the peer cannot take KV chunks ({exc})"
    missing = _json_field(answer, "missing")
    if not isinstance(missing, list) or not set(missing) <= set(header.chunks):
        raise PeerUnavailable(f"peer {peer.name} gave no list of missing chunks", peer=peer.name)
    result.chunks_held += len(header.chunks) - len(missing)
    wanted = set(missing)
    for key in header.chunks:
        if key not in wanted:
            continue
        found = await to_thread_to_completion(chunks.read, [key])
        if not found:
            break
        data = bytes(found[0])
        stored = await coordinator.forwarder.request(
            peer,
            "PUT",
            CHUNKS_PATH + f"?run_id={run_id}&key={key}&tokens={header.chunk_tokens}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            proven=True,
        )
        if _json_field(stored, "key") != key:
            raise PeerUnavailable(f"peer {peer.name} did not take chunk {key[:12]}", peer=peer.name)
        result.chunks_sent += 1
        result.bytes_sent += len(data)
    return None


def _json_field(answer: PeerAnswer, name: str) -> Any:
    """A field of the answer's JSON object; None if it is no such thing (a 200 that is not
    JSON is no pcrt peer's answer)."""
    try:
        body = answer.json()
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None


def _verified_header(blobs: BlobStore, sha: str) -> tuple[StateHeader, int]:
    """The state's header and size, once its bytes are checked against its name."""
    view = blobs.map(sha)
    return KVState.read_header(view), len(view)


def refusal_of(header: StateHeader, peer: Peer) -> str | None:
    """Why the peer would not load this state, or None when it would.

    The peer's model of the same name decides when it has one (a resumed node asks for
    that name); else any model with the state's sha256 that takes it. A peer that does not
    report its engines' keys is judged by the sha256 alone."""
    offers = [m for m in peer.models if m.sha256 == header.key.model_sha256]
    if not offers:
        return f"the peer lacks model {header.model}"
    named = [m for m in offers if m.name == header.model]
    problems = []
    for offer in named or offers:
        engine = peer.state_keys.get(offer.name)
        if engine is None:
            return None
        mismatches = key_mismatches(header.key, engine)
        if not mismatches:
            return None
        problems.append(mismatches)
    return "the peer's KV cache differs (here vs there): " + ", ".join(problems[0])


async def _send_record(coordinator: Coordinator, peer: Peer, payload: dict[str, Any]) -> PeerAnswer:
    """POST the run record; once more if no answer came (the connection failed or timed
    out): the peer may hold the run already, and answers a repeat as it did the first."""
    try:
        return await coordinator.forwarder.request(
            peer, "POST", RUNS_PATH, json_body=payload, timeout=RECORD_TIMEOUT, proven=True
        )
    except PeerUnavailable as exc:
        if exc.status is not None:  # it answered with an error: a repeat gets the same
            raise
        log.warning("sending run %s to %s again: %s", payload["run"]["id"], peer.name, exc)
    return await coordinator.forwarder.request(
        peer, "POST", RUNS_PATH, json_body=payload, timeout=RECORD_TIMEOUT, proven=True
    )
