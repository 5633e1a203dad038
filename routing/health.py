"""The peer health checks: which peers are alive and trusted, asked every few seconds.

Liveness comes from these checks, not from mDNS TTLs (minutes long). Every
``health_interval`` seconds each peer due is asked what it offers (``/v1/pcrt/node`` for a
pcrt peer, proving the cluster key both ways, and trusted only if it signs the answers
that carry results; ``/v1/models`` for an OpenAI-compatible one). A failed check takes the
peer out of rotation at once, into a cooldown that doubles per failure
(``peers.cooldown_seconds``), and gives up its long calls (``Forwarder.lost``); two slow
checks in a row are forgiven a peer busy computing. A peer that said goodbye and then does
not answer leaves the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pcrt.routing.auth import PROOF_HEADER, SIGNED_REPLIES, verify_proof
from pcrt.routing.forward import Forwarder
from pcrt.routing.peers import Peer, PeerTable, offers_from_models
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.errors import PcrtError, PeerError, PeerRejected, PeerUnavailable

__all__ = [
    "NODE_INFO_PATH",
    "SLOW_CHECKS_FORGIVEN",
    "HealthChecker",
]

log = logging.getLogger(__name__)

NODE_INFO_PATH = "/v1/pcrt/node"
PROBE_MAX_BYTES = 1 << 20  # node info and model lists are small
SLOW_CHECKS_FORGIVEN = 2  # timed-out health checks in a row before a peer leaves rotation


class HealthChecker:
    """Checks the peers of ``table`` with ``prober``'s client and keeps their health,
    trust and cooldowns there; ``forwarder`` is told when a peer is lost, so that the work
    waiting on it falls back."""

    def __init__(
        self,
        table: PeerTable,
        settings: PeerSettings,
        *,
        cluster_key: str | None,
        prober: Forwarder,
        forwarder: Forwarder,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.settings = settings
        self.cluster_key = cluster_key
        self.prober = prober
        self.forwarder = forwarder
        self.clock = clock
        self._loop_task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="pcrt-peer-health")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._probes):
            task.cancel()

    async def _loop(self) -> None:
        interval = self.settings.health_interval
        while True:
            try:
                now = self.clock()
                for peer in self.table.due(now):
                    peer.next_check = now + interval
                    self.probe_soon(peer)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop is liveness itself: it must outlive any error
                log.exception("the peer health loop hit an error; it goes on")
            await asyncio.sleep(min(0.25, interval))

    def probe_soon(self, peer: Peer) -> None:
        """Check ``peer`` now, in the background, unless a check of it is under way."""
        if peer.probing:
            return  # one probe per peer at a time: a slow peer cannot pile them up
        peer.probing = True
        task = asyncio.create_task(self.probe(peer), name=f"pcrt-probe-{peer.name}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def forward_failed(self, exc: PeerError) -> None:
        """A forward failed: the peer leaves rotation now, not at its next health check.
        Its other long calls go on: one broken stream or timed-out read says little about
        the rest. The health check at the end of the cooldown (1 s) gives the verdict, and
        only a failed check cancels them (``probe_failed``)."""
        if getattr(exc, "cooldown", True):
            self.table.record_failure(exc.peer, str(exc), self.clock())

    async def probe(self, peer: Peer) -> None:
        """One health check of ``peer``; its verdict goes to the table."""
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
            self.probe_failed(peer, str(exc) or type(exc).__name__, slow=slow)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bad peer must never stop the health loop
            log.exception("probing peer %s failed unexpectedly", peer.name)
            self.probe_failed(peer, "probe failed")
        finally:
            peer.probing = False

    def probe_failed(self, peer: Peer, error: str, *, slow: bool = False) -> None:
        """A check of ``peer`` failed (``slow``: it timed out): out of rotation, unless
        it is one of the slow checks forgiven a healthy peer."""
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
        self.table.record_failure(peer.name, error, self.clock())
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
        elif info.get(SIGNED_REPLIES) is not True:
            # its subgraph results and acknowledgements would come unproven: refused
            # after the work was done, so it gets none
            peer.trusted = False
            peer.trust_note = "an older pcrt that does not sign its answers: upgrade it"
        elif peer.node_id is not None and info.get("node_id") != peer.node_id:
            peer.trusted, peer.trust_note = False, "node id differs from its mDNS record"
        elif not await _answers_for_itself(peer.url, info):
            peer.trusted, peer.trust_note = False, "relayed: its answer names another node"
        else:
            peer.trusted, peer.trust_note = True, "cluster key proven"
        peer.take_node_info(info)
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
