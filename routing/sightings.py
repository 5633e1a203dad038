"""What an mDNS sighting means for the peer table: the peer it announces, or nothing.

A sighting is a claim anyone on the LAN can make. A pcrt daemon's record only says where
to ask (the health checks then make it prove the cluster key); an upstream announced by
``pcrt announce`` is believed only as far as its TXT signature verifies (``auth.py``).
"""

from __future__ import annotations

import logging
import re

from pcrt.routing.auth import verify_announcement
from pcrt.routing.discovery import PROTOCOL_VERSION, SERVICE_TYPE, Sighting
from pcrt.routing.peers import Peer, PeerKind

__all__ = ["peer_from_sighting", "peer_name"]

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
_KINDS: dict[str, PeerKind] = {"pcrt": "pcrt", "vllm": "vllm", "openai": "openai"}


def peer_name(instance: str) -> str:
    """The peer's name in the table: its mDNS instance name without the service type."""
    return instance.removesuffix("." + SERVICE_TYPE).removesuffix(SERVICE_TYPE).rstrip(".")


def peer_from_sighting(
    sighting: Sighting, *, cluster_key: str | None, cluster_key_env: str
) -> Peer | None:
    """The peer an added or updated sighting announces, not checked yet; None (logged)
    for a record this node cannot use: no address, an unknown kind, another protocol."""
    name = peer_name(sighting.instance)
    if not sighting.addresses or not sighting.port:
        return None
    props = sighting.properties
    kind = _KINDS.get(props.get("kind", "pcrt"))
    if kind is None:
        log.info("ignoring %s: unknown kind %r", name, props.get("kind"))
        return None
    if props.get("proto") != PROTOCOL_VERSION:
        log.info(
            "ignoring %s: protocol %r, this node speaks %s",
            name,
            props.get("proto"),
            PROTOCOL_VERSION,
        )
        return None
    address, port = sighting.addresses[0], sighting.port
    if kind == "pcrt":
        return Peer(
            name=name,
            url=f"http://{address}:{port}",
            kind="pcrt",
            source="mdns",
            node_id=props.get("id"),
        )
    signed = cluster_key is not None and verify_announcement(
        cluster_key, address, port, props, props.get("sig")
    )
    base = props.get("path", "").rstrip("/")
    # an env var name from the LAN is only honoured when the announcement proved the
    # cluster key, and never names the cluster key itself
    keyenv = props.get("keyenv") or None
    if not signed or (keyenv and not _usable_key_env(keyenv, cluster_key_env)):
        keyenv = None
    return Peer(
        name=name,
        url=f"http://{address}:{port}{base}",
        kind=kind,
        source="announce",
        node_id=props.get("id"),
        api_key_env=keyenv,
        static_tags=tuple(t for t in props.get("tags", "").split(",") if t),
        strength=_float(props.get("strength")),
        signature_ok=signed,
    )


def _usable_key_env(name: str, cluster_key_env: str) -> bool:
    return bool(_ENV_NAME.match(name)) and name != cluster_key_env


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
