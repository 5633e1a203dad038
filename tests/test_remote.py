"""DAG work on peers (``routing/remote.py``): a subgraph on a pcrt peer always has a read
limit, and its results are taken only proven with the cluster key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pcrt.routing.coordinator import Coordinator
from pcrt.routing.forward import Forwarder
from pcrt.routing.peers import Peer
from pcrt.routing.remote import SUBGRAPH_PATH
from pcrt.runtime.errors import PeerUnavailable
from tests.routing_helpers import KEY, Proof, StubServer


async def _run_subgraph(fw: Forwarder, url: str, timeout: float | None) -> dict[str, Any]:
    """``RemoteRunner.subgraph`` on a pcrt peer at ``url``, with ``timeout`` the DAG's."""
    from pcrt.routing.policy import Candidate
    from pcrt.routing.remote import RemoteRunner

    peer = Peer(name="p", url=url, kind="pcrt", source="static", trusted=True)
    coordinator = SimpleNamespace(forwarder=fw, node_name="edge", peer=lambda name: peer)
    candidate = Candidate(node="p", kind="pcrt", model="m", est_seconds=1.0, score=1.0, why="")
    return await RemoteRunner(cast(Coordinator, coordinator)).subgraph(candidate, {}, timeout)


class _ReadLimits(Forwarder):
    """A forwarder that sends nothing: it notes each request's read limit and answers
    with no nodes."""

    def __init__(self) -> None:
        super().__init__(cluster_key=KEY)
        self.limits: list[float | None] = []

    async def request(self, peer: Peer, method: str, path: str, **kw: Any) -> Any:
        self.limits.append(kw["timeout"].sock_read)
        return SimpleNamespace(json=lambda: {"nodes": {}})


async def test_a_subgraph_reads_for_the_dag_timeout_or_the_forwarders_own_limit() -> None:
    fw = _ReadLimits()
    await _run_subgraph(fw, "http://127.0.0.1:9", None)  # no DAG timeout: the forwarder's
    await _run_subgraph(fw, "http://127.0.0.1:9", 100.0)  # the DAG's own, with a margin
    assert fw.limits == [600.0, 130.0]


async def test_a_subgraph_peer_that_goes_silent_is_given_up_on() -> None:
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # takes the request, never answers
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    fw = Forwarder(cluster_key=KEY, read_timeout=0.2)  # the limit a DAG without a timeout gets
    try:
        with pytest.raises(PeerUnavailable):
            await asyncio.wait_for(_run_subgraph(fw, f"http://127.0.0.1:{port}", None), 10)
        assert accepted.is_set()
    finally:
        await fw.close()
        listener.close()
        await listener.wait_closed()


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    with StubServer() as running:
        yield running


RESULT = {
    "run_id": "sub",
    "status": "succeeded",
    "error": None,
    "nodes": {"describe": {"status": "succeeded", "output": "a red apple"}},
}


@pytest.mark.parametrize("proof", ["none", "altered", "other-key", "other-request"])
async def test_a_subgraph_result_is_taken_only_proven_by_the_peer(
    server: StubServer, proof: Proof
) -> None:
    """A subgraph's outputs become our run's: an answer with no proof (a pcrt of an older
    version) or a proof that fails (changed on the way: here an extra field; another key;
    another request's) is the peer's failure, and the next candidate runs the subgraph."""
    server.answers[SUBGRAPH_PATH] = RESULT
    fw = Forwarder(cluster_key=KEY)
    try:
        assert await _run_subgraph(fw, server.url, None) == RESULT
        server.proof = proof
        with pytest.raises(PeerUnavailable) as failed:
            await _run_subgraph(fw, server.url, None)
        assert failed.value.peer == "p" and failed.value.cooldown
        assert "cluster proof" in str(failed.value)
    finally:
        server.proof = "signed"
        await fw.close()
