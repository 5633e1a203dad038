"""Routes between peers: node info, the peer table, subgraphs run for another daemon,
runs and their states moved here.

The routes under ``/v1/pcrt/`` but ``peers`` answer only requests signed with the cluster
key (``Guard`` in ``guard.py`` checks the signature once and leaves the verdict in
``request.state.peer_verified``), and prove their answers with it (``_proven``: the
caller takes no result without the proof). ``/v1/pcrt/peers`` is for this node's own
users.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pcrt.cache.chunks import ChunkStore, is_chunk_key
from pcrt.cache.runs import RunExists, RunRecord
from pcrt.cache.status import RunStatus
from pcrt.routing.auth import CLUSTER_HEADER, PROOF_HEADER, SIGNED_REPLIES
from pcrt.routing.migrate import BLOBS_PATH, CHUNKS_PATH, MISSING_CHUNKS_PATH
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.dag.runner import check_run
from pcrt.runtime.engine.kv_chunks import KvLayoutError
from pcrt.runtime.engine.kv_chunks import parse as parse_kv
from pcrt.runtime.engine.state import verify_blob
from pcrt.runtime.errors import Conflict, InvalidRequest, Unauthorized
from pcrt.runtime.server.services import agent_of, services_of
from pcrt.runtime.server.uploads import disk_errors, receive_into, streamed_body_sha256
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["router"]

_Body = TypeVar("_Body", bound=BaseModel)

log = logging.getLogger(__name__)

router = APIRouter()


def _require_peer(request: Request) -> None:
    if not getattr(request.state, "peer_verified", False):
        raise Unauthorized(
            "this route is for pcrt peers: sign the request with the cluster key "
            f"({CLUSTER_HEADER})"
        )


async def _proven(request: Request, payload: dict[str, Any]) -> Response:
    """``payload`` as JSON, with this node's proof of the cluster key over the request it
    answers (its nonce) and these very bytes: a result the caller can trust as ours and
    unchanged. The body is rendered once, then hashed once, in a worker thread (a
    subgraph's node records may be megabytes)."""
    coordinator = services_of(request).coordinator
    header = request.headers[CLUSTER_HEADER]

    def render() -> Response:
        response = JSONResponse(payload)
        proof = coordinator.proof_for(header, bytes(response.body))
        if proof is not None:
            response.headers[PROOF_HEADER] = proof
        return response

    return await to_thread_to_completion(render)


async def _parsed(request: Request, model: type[_Body]) -> _Body:
    """The body as ``model``, parsed in a worker thread: a peer's may be up to
    ``peer_max_body_bytes`` (64 MiB) of JSON, a second of parsing. Bad JSON or a bad
    shape is the 400 that FastAPI's own parsing gives."""
    raw = await request.body()  # read (and bounded, and its signature checked) by Guard
    try:
        return await to_thread_to_completion(model.model_validate_json, raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@router.get("/v1/pcrt/node")
async def node_info(request: Request) -> Response:
    """What this node offers, with a proof that it holds the cluster key too."""
    _require_peer(request)
    services = services_of(request)
    # and that its other answers are proven too: a caller trusts no peer whose are not
    return await _proven(request, {**services.node.info(services.state), SIGNED_REPLIES: True})


@router.get("/v1/pcrt/peers")
async def peers(request: Request) -> dict[str, Any]:
    """The peer table, as ``pcrt peers`` shows it."""
    services = services_of(request)
    coordinator = services.coordinator
    return {
        "node": {
            "node_id": services.node.node_id,
            "name": services.node.name,
            "lan": coordinator.discovery is not None,
            "cluster_key": coordinator.cluster_key is not None,
        },
        "peers": coordinator.describe(),
    }


class SubgraphRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dag: dict[str, Any]  # the DAG restricted to the subgraph and the nodes it reads
    inputs: dict[str, Any] = {}
    done: dict[str, Any] = {}  # outputs of upstream nodes, computed by the caller
    nodes: list[str] = Field(min_length=1)  # the subgraph: what runs here
    origin: str = "peer"


@router.post("/v1/pcrt/subgraphs")
async def run_subgraph(request: Request) -> Response:
    """Run part of a peer's DAG here and answer with its node records."""
    _require_peer(request)
    body = await _parsed(request, SubgraphRequest)
    services = services_of(request)
    runner = services.dags.runner
    spec = await to_thread_to_completion(parse_dag, body.dag)  # 1,000 nodes: milliseconds
    # the peer's: never moved from here, and not resumed after a restart
    record = await runner.create_partial(
        spec, body.inputs, body.done, body.origin, agent=agent_of(request)
    )
    task = services.dags.start(record.id, for_peer=True)
    caller_left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, caller_left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        caller_left.cancel()
    if not task.done():
        # the peer gave up on us (it fell back elsewhere): no one will read this run
        await services.dags.cancel(record.id)
        log.info("subgraph run %s cancelled: %s stopped waiting for it", record.id, body.origin)
    final = await services.dags.outcome(record.id)  # the daemon stopping: "cancelled"
    nodes = {n.node_id: n for n in await services.dags.runs.nodes(record.id)}
    # the tool calls made here for the peer: its run records them too (status, budget)
    calls = await runner.deps.calls.of_run(record.id)
    answer = {
        "tool_calls": [{**c.view(), "result": c.result} for c in calls if c.node_id in nodes],
        "run_id": final.id,
        "status": final.status,
        "error": final.error,
        "nodes": {
            node_id: {
                "status": nodes[node_id].status,
                "output": nodes[node_id].output,
                "prompt_tokens": nodes[node_id].prompt_tokens,
                "cached_tokens": nodes[node_id].cached_tokens,
                "completion_tokens": nodes[node_id].completion_tokens,
                "seconds": nodes[node_id].seconds,
                "model": nodes[node_id].model,
                "cache_hit": nodes[node_id].cache_hit,
                "ran_on": nodes[node_id].ran_on,
            }
            for node_id in body.nodes
            if node_id in nodes
        },
    }
    return await _proven(request, answer)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.put(BLOBS_PATH)
async def receive_blob(
    request: Request, run_id: str | None = None, sha256: str | None = None
) -> Response:
    """A KV state a peer moves here with a run, streamed to disk as it arrives (a state
    of gigabytes costs a chunk of memory), then checked before it is stored: the hash
    the signature covers, the header, the length and the payload hash."""
    _require_peer(request)
    services = services_of(request)
    limit = services.settings.state_upload_max_bytes
    declared = streamed_body_sha256(request)
    with disk_errors(services.blobs), services.blobs.incoming() as blob:
        await receive_into(request, blob, limit)  # BodyTooLarge: 400
        if declared is not None and blob.sha256 != declared:
            raise Unauthorized(
                f"the body hashes to {blob.sha256[:12]}, not the signed {declared[:12]}"
                " (changed on the way?)"
            )

        def store() -> str:
            verify_blob(blob.finish())  # header, length, payload hash: StateError
            return blob.commit(run_id=run_id)

        stored = await to_thread_to_completion(store)
        return await _proven(request, {"id": stored, "size": blob.size})


class MissingChunks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(max_length=1_000_000)
    chunk_tokens: int = Field(ge=1)


@router.post(MISSING_CHUNKS_PATH)
async def missing_chunks(request: Request) -> Response:
    """Which of a chunked state's chunks this node lacks: a peer moving a run here sends
    only those."""
    _require_peer(request)
    body = await _parsed(request, MissingChunks)
    chunks = _chunk_store(request, body.chunk_tokens)
    missing = [key for key in body.keys if not chunks.holds(key)]
    return await _proven(request, {"missing": missing})


@router.put(CHUNKS_PATH)
async def receive_chunk(
    request: Request, key: str, tokens: int, run_id: str | None = None
) -> Response:
    """One KV chunk of a run a peer moves here (the guard read it whole and checked the
    signature over its bytes): kept on disk, pinned by the run, before its state's blob
    comes. Only a run of whole cells from the right position is kept."""
    _require_peer(request)
    chunks = _chunk_store(request, tokens)
    if not is_chunk_key(key):
        raise InvalidRequest("key must be a chunk's hex sha256")
    data = await request.body()

    def store() -> None:
        try:
            section = parse_kv(data)
        except KvLayoutError as exc:
            raise InvalidRequest(f"not a KV chunk: {exc}") from None
        if section.n_tokens != tokens or int(section.cells["pos"][0]) % tokens:
            raise InvalidRequest(f"not a chunk of {tokens} tokens at a chunk's position")
        chunks.put(key, data, tokens, durable=True)
        if run_id is not None:
            chunks.pin(run_id, [key])

    with disk_errors(services_of(request).blobs):
        await to_thread_to_completion(store)
    return await _proven(request, {"key": key, "size": len(data)})


def _chunk_store(request: Request, chunk_tokens: int) -> ChunkStore:
    chunks = services_of(request).chunks
    if chunks is None:
        raise InvalidRequest("this node keeps no KV chunks (its chunk store is off)")
    if chunks.chunk_tokens != chunk_tokens:
        raise InvalidRequest(
            f"this node's KV chunks are {chunks.chunk_tokens} tokens, not {chunk_tokens}"
        )
    return chunks


class MovedRun(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    spec: dict[str, Any]
    inputs: dict[str, Any] = {}
    tokens_used: int = Field(default=0, ge=0)
    nodes_executed: int = Field(default=0, ge=0)
    created_at: str | None = None
    agent: str | None = None  # as long as the header it came from: never a reason to refuse


class ImportRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: MovedRun
    nodes: list[dict[str, Any]]
    origin: str = "peer"


@router.post("/v1/pcrt/runs")
async def import_run(request: Request) -> Response:
    """A run migrated here: record it (its states arrived first) and resume it.

    The same run from the same origin again (the sender lost our answer and retried) is
    answered as the first time, with the run as it stands; it does not start twice."""
    _require_peer(request)
    body = await _parsed(request, ImportRun)
    services = services_of(request)
    runner = services.dags.runner

    def store() -> tuple[RunRecord, bool]:  # checks, blobs' files, records: a thread's
        spec = parse_dag(body.run.spec)  # a malformed spec is refused before storing
        # and one this node cannot run (a model it lacks): the source keeps the run
        check_run(spec, runner.registry, body.run.inputs)
        for node in body.nodes:
            for key in ("state_sha256", "checkpoint_sha256"):
                sha = node.get(key)
                if sha and not services.blobs.has(sha):
                    node[key] = None  # never point at a state that is not here: recompute
        run = {**body.run.model_dump(), "dag_path": spec.dag}
        return runner.runs.import_run(run, body.nodes, origin=body.origin)

    try:
        record, fresh = await to_thread_to_completion(store)
    except RunExists as exc:
        raise Conflict(str(exc)) from None
    if fresh:
        log.info("run %s moved here from %s", record.id, body.origin)
        services.dags.start(record.id)
        status = RunStatus.RUNNING
    else:
        log.info(
            "run %s from %s again: it is here already (%s)", record.id, body.origin, record.status
        )
        status = RunStatus.RUNNING if record.id in services.dags.tasks else record.status
    answer = {"id": record.id, "status": status, "url": f"/v1/dags/{record.id}"}
    return await _proven(request, answer)
