"""Who this node is to its peers: its stable id, the address it announces, every host name
it answers to (for signed destinations) and the hash of what it offers.

Nothing here keeps state: the coordinator asks once at start-up (and for the capabilities
hash, whenever the model list may have changed).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import uuid
from pathlib import Path

import psutil

__all__ = [
    "announce_address",
    "capabilities_hash",
    "ipv4_addresses",
    "load_node_id",
    "own_hosts",
]


def load_node_id(home: Path) -> str:
    """This node's stable id, made once and kept in the home dir (written atomically)."""
    path = home / "node_id"
    try:
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    node_id = uuid.uuid4().hex[:16]
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id, encoding="utf-8")
    tmp.replace(path)
    return node_id


def ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses, interface by interface (loopback included)."""
    return [
        str(a.address)
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET
    ]


def announce_address(host: str, interfaces: str | list[str]) -> str:
    """The IPv4 address peers should call: the bound one, else the first mDNS interface,
    else the first non-loopback address of this machine."""
    if host not in ("0.0.0.0", "", "::"):
        with contextlib.suppress(OSError):
            return socket.gethostbyname(host)
    if isinstance(interfaces, list) and interfaces:
        return interfaces[0]
    return next((a for a in ipv4_addresses() if not a.startswith("127.")), "127.0.0.1")


def own_hosts(announce_address: str) -> frozenset[str]:
    """Every name and IPv4 address this machine answers to, for signed destinations."""
    names = {
        announce_address,
        "127.0.0.1",
        "localhost",
        socket.gethostname().lower(),
        socket.getfqdn().lower(),
        *ipv4_addresses(),
    }
    return frozenset(n for n in names if n)


def capabilities_hash(models: list[str]) -> str:
    """A short hash of what a node offers: peers re-ask for node info when it changes."""
    return hashlib.sha256("\n".join(sorted(models)).encode()).hexdigest()[:12]
