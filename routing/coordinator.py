"""The coordinator: discovery, the peer table, the health checks and the policy together.

The daemon's lifespan builds one and closes it. It

- loads static peers from config and, with ``lan`` on, announces this daemon by mDNS and
  browses for others (``discovery.py``; what a sighting adds: ``sightings.py``);
- has every peer checked (``health.py``): a pcrt peer that cannot prove the cluster key,
  or an announced upstream whose TXT signature does not verify, stays untrusted and is
  never sent work; a failure takes a peer out of rotation at once, whatever mDNS TTLs say;
- checks the cluster signature of requests from peers (``auth.py``);
- answers "where should this run?" with ``policy.decide`` over the local node's view and
  the peer table (``peers.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pcrt.routing.auth import NonceCache, precheck_request, response_proof, verify_request
from pcrt.routing.discovery import Discovery, Sighting, interfaces_setting, txt_properties
from pcrt.routing.forward import Forwarder
from pcrt.routing.health import HealthChecker
from pcrt.routing.identity import capabilities_hash, own_hosts
from pcrt.routing.peers import MAX_PEERS, Peer, PeerTable
from pcrt.routing.policy import Decision, NodeView, PolicySettings, Work, decide
from pcrt.routing.settings import PeerSettings
from pcrt.routing.sightings import peer_from_sighting, peer_name
from pcrt.runtime.errors import PeerError

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)


class Coordinator:
    """``forwarder`` carries forwarded work, ``prober`` the health checks (default: a
    client each, made from ``settings``); ``clock`` is the monotonic time of cooldowns."""

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
        forwarder: Forwarder | None = None,
        prober: Forwarder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.node_name = node_name
        self.api_port = api_port
        self.announce_address = announce_address
        self.local_view = local_view
        self.local_models = local_models
        self.clock = clock
        self.cluster_key = settings.resolved_cluster_key()
        self.own_hosts = own_hosts(announce_address)
        self.table = PeerTable()
        self.nonces = NonceCache()
        self.policy = PolicySettings(battery_threshold=settings.battery_threshold)
        if forwarder is None:
            forwarder = Forwarder(
                cluster_key=self.cluster_key,
                connect_timeout=settings.connect_timeout,
                node_id=node_id,
            )
        # health checks have a client of their own: slow peers cannot exhaust the pool
        # that forwarded work uses
        if prober is None:
            prober = Forwarder(
                cluster_key=self.cluster_key,
                connect_timeout=settings.health_timeout,
                read_timeout=settings.health_timeout,
                node_id=node_id,
                max_connections=32,
            )
        self.forwarder, self.prober = forwarder, prober
        self.health = HealthChecker(
            self.table,
            settings,
            cluster_key=self.cluster_key,
            prober=self.prober,
            forwarder=self.forwarder,
            clock=clock,
        )
        self.discovery: Discovery | None = None
        self._instance: str | None = None
        self._announced_caps = ""
        self._announce_task: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        for static in self.settings.static:
            self.table.upsert(Peer.from_static(static))
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
            self._announce_task = asyncio.create_task(self._announce(), name="pcrt-announce")
        self.health.start()

    async def close(self) -> None:
        if self._announce_task is not None:
            self._announce_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announce_task
        await self.health.close()
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
            if self.table.all_checked() and time.monotonic() >= listen_until:
                return
            await asyncio.sleep(0.05)

    @property
    def enabled(self) -> bool:
        """Whether any peer could ever be used (static peers or discovery)."""
        return self.discovery is not None or bool(self.settings.static)

    # -- decisions ----------------------------------------------------------------

    def decide(self, work: Work, *, include_local: bool = True) -> Decision:
        local = self.local_view() if include_local else None
        return decide(work, local, self.table.views(self.clock()), self.policy)

    def peer(self, name: str) -> Peer | None:
        return self.table.get(name)

    def report_failure(self, exc: PeerError) -> None:
        """A forward failed: the peer leaves rotation now (``HealthChecker.forward_failed``)."""
        self.health.forward_failed(exc)

    def remote_names(self) -> tuple[set[str], set[str]]:
        """Model names (and aliases) and tags offered by trusted peers: a DAG may name them."""
        return self.table.remote_names()

    def remote_tools(self) -> set[str]:
        """The tools trusted peers offer as idempotent (``PeerTable.remote_tools``)."""
        return self.table.remote_tools()

    def describe(self) -> list[dict[str, Any]]:
        return self.table.describe(self.clock())

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

    def precheck_peer_request(self, header: str | None, method: str, path: str) -> str | None:
        """What refuses a signed request before its body is read (see
        ``auth.precheck_request``), or None: the body is then read and the whole
        signature checked by ``check_peer_request``."""
        if self.cluster_key is None:
            return "this daemon has no cluster key"
        return precheck_request(
            self.cluster_key,
            header,
            method,
            path,
            self.nonces,
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

    async def _announce(self) -> None:
        """Announce once our API accepts connections (the lifespan starts before uvicorn
        binds, and a peer that called too early would put us in cooldown), then announce
        again whenever the models offered here change."""
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
            properties=txt_properties(
                node_id=self.node_id, port=self.api_port, caps=self._announced_caps
            ),
        )
        log.info("announced as %s on %s", self._instance, self.settings.interfaces)
        while True:
            await asyncio.sleep(min(0.25, self.settings.health_interval))
            try:
                await self._reannounce_if_changed()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed update must not end the announcements
                log.exception("re-announcing this node failed; it goes on")

    async def _reannounce_if_changed(self) -> None:
        if self.discovery is None or self._instance is None:
            return
        caps = capabilities_hash(self.local_models())
        if caps != self._announced_caps:
            self._announced_caps = caps
            await self.discovery.update(
                self._instance,
                txt_properties(node_id=self.node_id, port=self.api_port, caps=caps),
            )

    def _on_sighting(self, change: str, sighting: Sighting) -> None:
        name = peer_name(sighting.instance)
        known = self.table.get(name)
        if known is not None and known.source == "static":
            return  # configured peers are not mDNS's to change or remove
        if change == "removed":
            # a goodbye is a hint anyone could send: the peer goes when it stops answering
            if known is not None:
                known.goodbye = True
                self.health.probe_soon(known)
            return
        if known is None and self.table.full:
            log.warning("ignoring %s: the peer table is full (%d)", name, MAX_PEERS)
            return
        peer = peer_from_sighting(
            sighting,
            cluster_key=self.cluster_key,
            cluster_key_env=self.settings.cluster_key_env,
        )
        if peer is None:
            return
        peer = self.table.upsert(peer)
        if known is not peer:
            log.info("peer %s at %s (%s)", name, peer.url, "moved" if known else "new")
        peer.next_check = 0.0
        self.health.probe_soon(peer)
