"""The coordinator's discovery wiring (``routing/coordinator.py``): which mDNS sightings
reach the peer table. No mDNS: sightings are handed in."""

from __future__ import annotations

from pcrt.routing.peers import Peer
from pcrt.routing.settings import PeerSettings, StaticPeer
from tests.routing_helpers import bare_coordinator


async def test_sightings_of_another_protocol_or_over_a_static_peer_are_ignored() -> None:
    from pcrt.routing.discovery import SERVICE_TYPE, Sighting

    static = StaticPeer(name="gpu-box", url="http://10.0.0.5:8000", kind="vllm")
    coordinator = bare_coordinator(PeerSettings(static=(static,)))
    try:
        # as start() would put it
        coordinator.table.upsert(Peer(name="gpu-box", url=static.url, kind="vllm", source="static"))
        future = Sighting(f"future.{SERVICE_TYPE}", ("127.0.0.1",), 9, {"proto": "2", "id": "x"})
        coordinator._on_sighting("added", future)
        assert coordinator.table.get("future") is None
        spoof = Sighting(f"gpu-box.{SERVICE_TYPE}", ("127.0.0.1",), 9, {"proto": "1"})
        coordinator._on_sighting("added", spoof)
        coordinator._on_sighting("removed", spoof)
        box = coordinator.table.get("gpu-box")
        assert box is not None and box.url == static.url and box.source == "static"
    finally:
        await coordinator.forwarder.close()
        await coordinator.prober.close()
