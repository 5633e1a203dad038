"""The peer health checks (``routing/health.py``): what a failed or slow check does, and
a configured upstream checked without a model list (against a stub peer on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from pcrt.routing.coordinator import Coordinator
from pcrt.routing.policy import NodeView
from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.errors import PeerUnavailable
from tests.routing_helpers import (
    StubServer,
    mdns_peer,
)


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    with StubServer() as running:
        yield running


async def test_two_slow_checks_are_forgiven_a_third_takes_the_peer_out() -> None:
    coordinator = Coordinator(
        PeerSettings(),
        node_id="n",
        node_name="n",
        api_port=1,
        announce_address="127.0.0.1",
        local_view=lambda: NodeView(name="local", kind="local", models=()),
        local_models=list,
    )
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
    coordinator = Coordinator(
        PeerSettings(static=(listed, unlisted)),
        node_id="n",
        node_name="n",
        api_port=1,
        announce_address="127.0.0.1",
        local_view=lambda: NodeView(name="local", kind="local", models=()),
        local_models=list,
    )
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
