"""Routes between peers: node info, the peer table, subgraphs run for another daemon.

``/v1/pcrt/node`` and ``/v1/pcrt/subgraphs`` answer only requests signed with the cluster
key (``require_key`` in ``app.py`` checks the signature once and leaves the verdict in
``request.state.peer_verified``). ``/v1/pcrt/peers`` is for this node's own users.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from pcrt.routing.auth import CLUSTER_HEADER, PROOF_HEADER
from pcrt.runtime.api.service import Services
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.errors import Unauthorized

__all__ = ["router"]

router = APIRouter()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _require_peer(request: Request) -> None:
    if not getattr(request.state, "peer_verified", False):
        raise Unauthorized(
            "this route is for pcrt peers: sign the request with the cluster key "
            f"({CLUSTER_HEADER})"
        )


@router.get("/v1/pcrt/node")
async def node_info(request: Request) -> Response:
    """What this node offers, with a proof that it holds the cluster key too."""
    _require_peer(request)
    services = _services(request)
    body = json.dumps(services.node.info(services.state)).encode()
    headers = {}
    proof = services.coordinator.proof_for(request.headers[CLUSTER_HEADER], body)
    if proof is not None:
        headers[PROOF_HEADER] = proof
    return Response(body, media_type="application/json", headers=headers)


@router.get("/v1/pcrt/peers")
async def peers(request: Request) -> dict[str, Any]:
    """The peer table, as ``pcrt peers`` shows it."""
    services = _services(request)
    coordinator = services.coordinator
    return {
        "node": {
            "node_id": services.node.node_id,
            "name": services.node.name,
            "lan": coordinator.discovery is not None,
            "cluster_key": coordinator.cluster_key is not None,
        },  # fmt: skip
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
async def run_subgraph(body: SubgraphRequest, request: Request) -> dict[str, Any]:
    """Run part of a peer's DAG here and answer with its node records."""
    _require_peer(request)
    services = _services(request)
    runner = services.dags.runner
    spec = parse_dag(body.dag)
    record = runner.create_partial(spec, body.inputs, body.done, body.origin)
    task = services.dags.start(record.id)
    final = await task
    nodes = {n.node_id: n for n in runner.runs.nodes(record.id)}
    return {
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
