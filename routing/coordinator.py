"""The coordinator: discovery, the peer table, health checks and routing decisions together.

The daemon's lifespan builds one and closes it. It

- loads static peers from config and, with ``lan`` on, announces this daemon by mDNS and
  browses for others (``discovery.py``);
- asks every peer what it offers, proving the cluster key both ways (``auth.py``): a pcrt
  peer that cannot prove the key, or an announced upstream whose TXT signature does not
  verify, stays untrusted and is never sent work;
- checks each peer every ``health_interval`` seconds; a failure takes it out of rotation at
  once (cooldown with backoff), whatever mDNS TTLs say;
- answers "where should this run?" with ``policy.decide`` over the local node's view and
  the peer table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from pcrt.routing.auth import (
    CLUSTER_HEADER,
    PROOF_HEADER,
    NonceCache,
    response_proof,
    verify_announcement,
    verify_proof,
    verify_request,
)
from pcrt.routing.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    Sighting,
    interfaces_setting,
)
from pcrt.routing.discovery import txt_properties as make_txt
from pcrt.routing.forward import Forwarder
from pcrt.routing.peers import (
    Peer,
    PeerTable,
    offers_from_models,
    offers_from_node_info,
    reported_number,
    state_keys_from_node_info,
)
from pcrt.routing.policy import Decision, NodeView, PolicySettings, Work, decide
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.errors import PcrtError, PeerError, PeerRejected, PeerUnavailable

__all__ = [
    "CLUSTER_HEADER",
    "NODE_INFO_PATH",
    "Coordinator",
    "announce_address",
    "capabilities_hash",
    "load_node_id",
]

log = logging.getLogger(__name__)

NODE_INFO_PATH = "/v1/pcrt/node"
MAX_PEERS = 64  # mDNS is open to anyone on the LAN: the table must not grow without bound
PROBE_MAX_BYTES = 1 << 20  # node info and model lists are small
SLOW_CHECKS_FORGIVEN = 2  # timed-out health checks in a row before a peer leaves rotation
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")


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


def _label(instance: str) -> str:
    return instance.removesuffix("." + SERVICE_TYPE).removesuffix(SERVICE_TYPE).rstrip(".")


class Coordinator:
    def __init__(
        self,
        settings: PeerSettings,
        *,
        node_id: str,
        node_name: str,
        api_port: int,
        announce_address: str,
        local_view: Callable[[], NodeView],
        local_models: Callable[[], list[str]],
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.node_name = node_name
        self.api_port = api_port
        self.announce_address = announce_address
        self.local_view = local_view
        self.local_models = local_models
        self.cluster_key = settings.resolved_cluster_key()
        self.own_hosts = own_hosts(announce_address)
        self.table = PeerTable()
        self.nonces = NonceCache()
        self.policy = PolicySettings(battery_threshold=settings.battery_threshold)
        self.forwarder = Forwarder(
            cluster_key=self.cluster_key,
            connect_timeout=settings.connect_timeout,
            node_id=node_id,
        )
        # health checks have a client of their own: slow peers cannot exhaust the pool
        # that forwarded work uses
        self.prober = Forwarder(
            cluster_key=self.cluster_key,
            connect_timeout=settings.health_timeout,
            read_timeout=settings.health_timeout,
            node_id=node_id,
            max_connections=32,
        )
        self.discovery: Discovery | None = None
        self._instance: str | None = None
        self._announced_caps = ""
        self._loop_task: asyncio.Task[None] | None = None
        self._announce_task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        for static in self.settings.static:
            self.table.upsert(
                Peer(
                    name=static.name,
                    url=static.url.rstrip("/"),
                    kind=static.kind,
                    source="static",
                    api_key_env=static.api_key_env,
                    static_tags=static.tags,
                    strength=static.strength,
                    configured_models=static.models,
                    # the user configured it: an OpenAI-compatible peer is trusted; a pcrt
                    # peer still has to prove the cluster key
                    trusted=static.kind != "pcrt",
                    trust_note="configured",
                )
            )
        interfaces = interfaces_setting(self.settings.interfaces) if self.settings.lan else None
        if interfaces is not None:
            if self.announce_address.startswith("127.") and self.settings.interfaces == "all":
                log.warning(
                    "announcing %s on the LAN: peers elsewhere cannot reach a daemon bound to "
                    "loopback (pcrt serve --host 0.0.0.0 --api-key ...)",
                    self.announce_address,
                )
            self.discovery = Discovery(interfaces=interfaces, on_change=self._on_sighting)
            await self.discovery.start()
            self._announce_task = asyncio.create_task(
                self._announce_when_listening(), name="pcrt-announce"
            )
        self._loop_task = asyncio.create_task(self._health_loop(), name="pcrt-peer-health")

    async def _announce_when_listening(self) -> None:
        """Announce once our API accepts connections: the lifespan starts before uvicorn
        binds, and a peer that called too early would put us in cooldown."""
        assert self.discovery is not None
        while True:
            try:
                _, writer = await asyncio.open_connection(self.announce_address, self.api_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        self._announced_caps = capabilities_hash(self.local_models())
        self._instance = await self.discovery.announce(
            name=self.node_name,
            address=self.announce_address,
            port=self.api_port,
            properties=make_txt(
                node_id=self.node_id, port=self.api_port, caps=self._announced_caps
            ),
        )
        log.info("announced as %s on %s", self._instance, self.settings.interfaces)

    async def close(self) -> None:
        for task in (self._announce_task, self._loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in list(self._probes):
            task.cancel()
        if self.discovery is not None:
            await self.discovery.close()  # goodbye packets: peers drop us at once
        await self.forwarder.close()
        await self.prober.close()

    async def settle(self, *, browse: float = 2.0, limit: float = 6.0) -> None:
        """Return once the peers that answer at start-up are known: discovery has listened
        for ``browse`` seconds (answers to its first query come within about one) and every
        peer seen has passed or failed its first health check; at most ``limit`` seconds."""
        started = time.monotonic()
        listen_until = started + (browse if self.discovery is not None else 0.0)
        while time.monotonic() < started + limit:
            checked = all(p.healthy or p.failures for p in self.table.all())
            if checked and time.monotonic() >= listen_until:
                return
            await asyncio.sleep(0.05)

    @property
    def enabled(self) -> bool:
        """Whether any peer could ever be used (static peers or discovery)."""
        return self.discovery is not None or bool(self.settings.static)

    # -- decisions ----------------------------------------------------------------

    def decide(self, work: Work, *, include_local: bool = True) -> Decision:
        local = self.local_view() if include_local else None
        return decide(work, local, self.table.views(time.monotonic()), self.policy)

    def peer(self, name: str) -> Peer | None:
        return self.table.get(name)

    def report_failure(self, exc: PeerError) -> None:
        """A forward failed: the peer leaves rotation now, not at its next health check.
        Its other long calls go on: one broken stream or timed-out read says little about
        the rest. The health check at the end of the cooldown (1 s) gives the verdict, and
        only a failed check cancels them (``_probe_failed``)."""
        if getattr(exc, "cooldown", True):
            self.table.record_failure(exc.peer, str(exc), time.monotonic())

    def remote_names(self) -> tuple[set[str], set[str]]:
        """Model names (and aliases) and tags offered by trusted peers: a DAG may name them."""
        names: set[str] = set()
        tags: set[str] = set()
        for peer in self.table.all():
            if not peer.trusted:
                continue
            for offer in peer.models:
                names.add(offer.name)
                names.update(offer.aliases)
                tags.update(offer.tags)
        return names, tags

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [p.describe(now) for p in self.table.all()]

    # -- authentication of incoming peer requests ---------------------------------

    def check_peer_request(
        self,
        header: str | None,
        method: str,
        path: str,
        body: bytes = b"",
        body_sha256: str | None = None,
    ) -> str | None:
        """None if the request carries a valid cluster signature, else why not."""
        if self.cluster_key is None:
            return "this daemon has no cluster key"
        return verify_request(
            self.cluster_key,
            header,
            method,
            path,
            self.nonces,
            body=body,
            body_sha256=body_sha256,
            authority_ok=self.is_own_authority,
        )

    def is_own_authority(self, authority: str) -> bool:
        """Whether ``host:port`` names this daemon (a request signed for another node
        must not be accepted here)."""
        host, _, port = authority.rpartition(":")
        return port == str(self.api_port) and host.strip("[]").lower() in self.own_hosts

    def proof_for(self, request_header_value: str, body: bytes) -> str | None:
        if self.cluster_key is None:
            return None
        return response_proof(self.cluster_key, request_header_value, body)

    # -- discovery ----------------------------------------------------------------

    def _on_sighting(self, change: str, sighting: Sighting) -> None:
        name = _label(sighting.instance)
        known = self.table.get(name)
        if known is not None and known.source == "static":
            return  # configured peers are not mDNS's to change or remove
        if change == "removed":
            # a goodbye is a hint anyone could send: the peer goes when it stops answering
            if known is not None:
                known.goodbye = True
                self._probe_soon(known)
            return
        if known is None and len(self.table.all()) >= MAX_PEERS:
            log.warning("ignoring %s: the peer table is full (%d)", name, MAX_PEERS)
            return
        if not sighting.addresses or not sighting.port:
            return
        props = sighting.properties
        kind = props.get("kind", "pcrt")
        if kind not in ("pcrt", "vllm", "openai"):
            log.info("ignoring %s: unknown kind %r", name, kind)
            return
        if props.get("proto") != PROTOCOL_VERSION:
            log.info(
                "ignoring %s: protocol %r, this node speaks %s",
                name,
                props.get("proto"),
                PROTOCOL_VERSION,
            )
            return
        address, port = sighting.addresses[0], sighting.port
        if kind == "pcrt":
            peer = Peer(
                name=name,
                url=f"http://{address}:{port}",
                kind="pcrt",
                source="mdns",
                node_id=props.get("id"),
            )
        else:
            signed = self.cluster_key is not None and verify_announcement(
                self.cluster_key, address, port, props, props.get("sig")
            )
            base = props.get("path", "").rstrip("/")
            # an env var name from the LAN is only honoured when the announcement proved
            # the cluster key, and never names the cluster key itself
            keyenv = props.get("keyenv") or None
            if not signed or (keyenv and not self._usable_key_env(keyenv)):
                keyenv = None
            peer = Peer(
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
        peer = self.table.upsert(peer)
        if known is not peer:
            log.info("peer %s at %s (%s)", name, peer.url, "moved" if known else "new")
        peer.next_check = 0.0
        self._probe_soon(peer)

    def _usable_key_env(self, name: str) -> bool:
        return bool(_ENV_NAME.match(name)) and name != self.settings.cluster_key_env

    def _probe_soon(self, peer: Peer) -> None:
        if peer.probing:
            return  # one probe per peer at a time: a slow peer cannot pile them up
        peer.probing = True
        task = asyncio.create_task(self._probe(peer), name=f"pcrt-probe-{peer.name}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    # -- health -------------------------------------------------------------------

    async def _health_loop(self) -> None:
        interval = self.settings.health_interval
        while True:
            try:
                now = time.monotonic()
                for peer in self.table.due(now):
                    peer.next_check = now + interval
                    self._probe_soon(peer)
                await self._reannounce_if_changed()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop is liveness itself: it must outlive any error
                log.exception("the peer health loop hit an error; it goes on")
            await asyncio.sleep(min(0.25, interval))

    async def _reannounce_if_changed(self) -> None:
        if self.discovery is None or self._instance is None:
            return
        caps = capabilities_hash(self.local_models())
        if caps != self._announced_caps:
            self._announced_caps = caps
            await self.discovery.update(
                self._instance, make_txt(node_id=self.node_id, port=self.api_port, caps=caps)
            )

    async def _probe(self, peer: Peer) -> None:
        try:
            # one deadline for the whole answer: a peer trickling bytes cannot hold it
            async with asyncio.timeout(self.settings.health_timeout * 2):
                if peer.kind == "pcrt":
                    await self._probe_pcrt(peer)
                else:
                    await self._probe_openai(peer)
            peer.goodbye = False
            peer.slow_checks = 0
        except (PcrtError, ValueError, TypeError, AttributeError, TimeoutError) as exc:
            slow = isinstance(exc, TimeoutError) or getattr(exc, "timed_out", False)
            self._probe_failed(peer, str(exc) or type(exc).__name__, slow=slow)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bad peer must never stop the health loop
            log.exception("probing peer %s failed unexpectedly", peer.name)
            self._probe_failed(peer, "probe failed")
        finally:
            peer.probing = False

    def _probe_failed(self, peer: Peer, error: str, *, slow: bool = False) -> None:
        if self.table.get(peer.name) is not peer:
            return
        if peer.goodbye:
            self.table.remove(peer.name)  # it said goodbye and does not answer: gone
            log.info("peer %s said goodbye", peer.name)
            return
        if slow and peer.healthy and peer.slow_checks < SLOW_CHECKS_FORGIVEN:
            # a slow answer from a peer busy computing is not death: ask again at once; the
            # third in a row takes it out (within ~4 s of a hang, at 1 s per check)
            peer.slow_checks += 1
            peer.next_check = 0.0
            return
        self.table.record_failure(peer.name, error, time.monotonic())
        self.forwarder.lost(peer.name)  # a hung peer's subgraphs and streams fall back now
        log.info("peer %s out of rotation: %s", peer.name, error)

    async def _probe_pcrt(self, peer: Peer) -> None:
        timeout = self.settings.health_timeout
        started = time.perf_counter()
        try:
            answer = await self.prober.request(
                peer, "GET", NODE_INFO_PATH, timeout=timeout, max_bytes=PROBE_MAX_BYTES
            )
        except PeerUnavailable as exc:
            if exc.status != 401:
                raise
            if self.table.get(peer.name) is not peer:
                return  # replaced while we asked (it moved): its own probe is under way
            # alive, but in another cluster (or none): listed, never sent work
            peer.trusted, peer.trust_note = False, "refused our cluster key"
            peer.models, peer.state_keys = (), {}
            self.table.record_success(peer.name, time.perf_counter() - started)
            return
        if self.table.get(peer.name) is not peer:
            return
        info = answer.json()
        if not isinstance(info, dict):
            raise ValueError("node info is not an object")
        if self.cluster_key is None:
            peer.trusted, peer.trust_note = False, "no cluster key configured here"
        elif not verify_proof(
            self.cluster_key,
            answer.sent_cluster_header or "",
            answer.body,
            answer.headers.get(PROOF_HEADER),
        ):
            peer.trusted, peer.trust_note = False, "could not prove the cluster key"
        elif peer.node_id is not None and info.get("node_id") != peer.node_id:
            peer.trusted, peer.trust_note = False, "node id differs from its mDNS record"
        elif not await _answers_for_itself(peer.url, info):
            peer.trusted, peer.trust_note = False, "relayed: its answer names another node"
        else:
            peer.trusted, peer.trust_note = True, "cluster key proven"
        peer.node_id = info.get("node_id") or peer.node_id
        peer.models = offers_from_node_info(info)
        peer.state_keys = state_keys_from_node_info(info)
        peer.queue_depth = int(info.get("queue_depth") or 0)
        peer.slots = int(info.get("slots") or 1)
        battery = info.get("battery")
        battery = battery if isinstance(battery, dict) else {}
        peer.battery_percent = reported_number(battery.get("percent"))
        peer.on_battery = battery.get("plugged_in") is False
        device = info.get("device")
        peer.device = device if isinstance(device, dict) else {}
        self.table.record_success(peer.name, answer.seconds)

    async def _probe_openai(self, peer: Peer) -> None:
        started = time.perf_counter()
        try:
            answer = await self.prober.request(
                peer,
                "GET",
                "/v1/models",
                timeout=self.settings.health_timeout,
                max_bytes=PROBE_MAX_BYTES,
            )
        except PeerRejected as exc:
            # models from config: any answer short of a server error means it is up
            if not peer.configured_models or exc.status not in (404, 405):
                raise
            answer = None
        if self.table.get(peer.name) is not peer:
            return
        if peer.configured_models:
            peer.models = offers_from_models(
                {"data": [{"id": m} for m in peer.configured_models]},
                peer.static_tags,
                peer.strength,
            )
        else:
            assert answer is not None
            listing = answer.json()
            if not isinstance(listing, dict):
                raise ValueError("/v1/models is not an object")
            peer.models = offers_from_models(listing, peer.static_tags, peer.strength)
        if peer.source == "announce":
            if peer.signature_ok:
                peer.trusted, peer.trust_note = True, "announcement signed with the cluster key"
            else:
                peer.trusted, peer.trust_note = False, "announcement not signed with our key"
        self.table.record_success(peer.name, time.perf_counter() - started)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


async def _answers_for_itself(url: str, info: dict[str, Any]) -> bool:
    """The proven node info names the node's own addresses and port; the URL we called
    must be one of them, else someone relayed another member's answer."""
    parts = urlsplit(url)
    addresses = info.get("addresses")
    if not isinstance(addresses, list) or info.get("port") != parts.port:
        return False
    host = parts.hostname or ""
    if host in addresses:
        return True
    try:
        resolved = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
    except OSError:
        return False
    return any(entry[4][0] in addresses for entry in resolved)
