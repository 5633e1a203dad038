"""The peer health checks (``routing/health.py``): what a failed or slow check does, a
configured upstream checked without a model list, and a pcrt peer whose answers are not
signed never trusted (against a stub peer on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from pcrt.routing.auth import SIGNED_REPLIES
from pcrt.routing.health import NODE_INFO_PATH
from pcrt.routing.policy import Work
from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.errors import PeerUnavailable
from tests.routing_helpers import (
    KEY,
    StubServer,
    bare_coordinator,
    mdns_peer,
)


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    with StubServer() as running:
        yield running


async def test_two_slow_checks_are_forgiven_a_third_takes_the_peer_out() -> None:
    coordinator = bare_coordinator(PeerSettings())
    try:
        busy = coordinator.table.upsert(mdns_peer(name="busy", trusted=True, healthy=True))
        for _ in range(2):
            coordinator.health.probe_failed(busy, "ReadTimeout", slow=True)
            assert busy.in_rotation(time.monotonic()) and busy.next_check == 0.0
        coordinator.health.probe_failed(busy, "ReadTimeout", slow=True)
        assert not busy.in_rotation(time.monotonic()) and busy.failures == 1
        dead = coordinator.table.upsert(mdns_peer(name="dead", trusted=True, healthy=True))
        coordinator.health.probe_failed(dead, "ConnectError")  # refused: out at once
        assert not dead.in_rotation(time.monotonic())
        gone = coordinator.table.upsert(mdns_peer(name="gone", trusted=True, healthy=True))
        gone.goodbye = True  # it said goodbye and then did not answer: removed
        coordinator.health.probe_failed(gone, "ConnectError")
        assert coordinator.table.get("gone") is None
        # one failed forward (a broken stream, a malformed answer) takes a peer out of
        # rotation but leaves its other long calls running; a failed check cancels them
        flaky = coordinator.table.upsert(mdns_peer(name="flaky", trusted=True, healthy=True))
        long_call = asyncio.ensure_future(
            coordinator.forwarder.until_lost(flaky, asyncio.sleep(30))
        )
        await asyncio.sleep(0)
        coordinator.report_failure(PeerUnavailable("stream broke", peer="flaky"))
        await asyncio.sleep(0.05)
        assert not flaky.in_rotation(time.monotonic()) and not long_call.done()
        coordinator.health.probe_failed(flaky, "ConnectError")
        with pytest.raises(PeerUnavailable, match="stopped answering"):
            await long_call
    finally:
        await coordinator.forwarder.close()
        await coordinator.prober.close()


async def test_a_static_peer_with_configured_models_needs_no_model_list(server: StubServer) -> None:
    """A configured cloud endpoint may have no /v1/models: its models come from config and
    any answer short of a server error keeps it up; without configured models it is down."""
    listed = StaticPeer(
        name="cloud", url=server.url, kind="openai", models=("big",), tags=("complex",)
    )
    unlisted = StaticPeer(name="bare", url=server.url, kind="openai")
    coordinator = bare_coordinator(PeerSettings(static=(listed, unlisted)))
    try:
        await coordinator.start()
        for name in ("cloud", "bare"):
            peer = coordinator.table.get(name)
            assert peer is not None
            await coordinator.health.probe(peer)
        now = time.monotonic()
        cloud, bare = coordinator.table.get("cloud"), coordinator.table.get("bare")
        assert cloud is not None and bare is not None
        assert cloud.in_rotation(now) and [m.name for m in cloud.models] == ["big"]
        assert cloud.models[0].tags == ("complex",)
        assert not bare.in_rotation(now) and bare.failures >= 1  # the health loop asks too
    finally:
        await coordinator.close()


async def test_a_pcrt_peer_whose_answers_are_not_signed_is_never_trusted(
    server: StubServer,
) -> None:
    """A pcrt of an older version proves the key on node info but signs none of its other
    answers: work sent to it would come back unproven and be refused after it was done,
    so it gets none, and ``pcrt peers`` says why."""
    port = int(server.url.rsplit(":", 1)[1])
    info = {"node_id": "old", "addresses": ["127.0.0.1"], "port": port, "models": []}
    coordinator = bare_coordinator(
        PeerSettings(cluster_key=KEY, static=(StaticPeer(name="b", url=server.url, kind="pcrt"),))
    )
    try:
        await coordinator.start()
        peer = coordinator.table.get("b")
        assert peer is not None
        for said, trusted, note in (
            ({SIGNED_REPLIES: True}, True, "cluster key proven"),
            ({}, False, "an older pcrt that does not sign its answers: upgrade it"),
        ):
            server.answers[NODE_INFO_PATH] = {**info, **said}
            await coordinator.health.probe(peer)
            assert (peer.trusted, peer.trust_note) == (trusted, note)
            assert peer.healthy  # alive, and listed: only trust is withheld
        rejected = dict(coordinator.decide(Work(route="peer")).rejected)
        assert rejected["b"].startswith("untrusted")
    finally:
        server.answers.pop(NODE_INFO_PATH, None)
        await coordinator.close()
