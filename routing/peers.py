"""The peer table: every known peer, what it offers, whether it is trusted and healthy.

Peers arrive three ways: mDNS (other pcrt daemons, and upstreams announced by
``pcrt announce``), static config (cloud endpoints), and nothing else. An mDNS record only
says where to ask: models, speed and load come from an HTTP call to the peer, and trust
from the cluster key (see ``auth.py``).

Liveness comes from health checks, not mDNS TTLs (minutes long): a failed check or a failed
forward puts the peer in cooldown at once, with exponential backoff as LiteLLM's router
does, and a peer in cooldown is out of rotation until a check succeeds again.

This module holds state and no I/O: ``health.py`` asks the peers, ``coordinator.py`` wires
discovery to the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pcrt.routing.policy import ModelOffer, NodeView
from pcrt.routing.settings import StaticPeer
from pcrt.routing.statekey import EngineKey

__all__ = [
    "MAX_PEERS",
    "Peer",
    "PeerKind",
    "PeerTable",
    "cooldown_seconds",
    "offers_from_models",
    "offers_from_node_info",
    "reported_count",
    "reported_number",
    "state_keys_from_node_info",
]

PeerKind = Literal["pcrt", "vllm", "openai"]
PeerSource = Literal["mdns", "static", "announce"]

COOLDOWN_BASE = 1.0  # seconds after the first failure
COOLDOWN_MAX = 30.0
MAX_PEERS = 64  # mDNS is open to anyone on the LAN: the table must not grow without bound


def cooldown_seconds(failures: int) -> float:
    """1, 2, 4, ... seconds, capped: a flapping peer is asked less and less often."""
    if failures <= 0:
        return 0.0
    return float(min(COOLDOWN_MAX, COOLDOWN_BASE * 2 ** min(failures - 1, 32)))


@dataclass
class Peer:
    name: str
    url: str  # base URL, no trailing slash: http://host:port
    kind: PeerKind
    source: PeerSource
    node_id: str | None = None
    api_key_env: str | None = None  # openai/vllm peers: env var holding their bearer key
    trusted: bool = False
    trust_note: str = "not asked yet"
    models: tuple[ModelOffer, ...] = ()
    # pcrt peers: the key each model's engine gives KV states, by model name (absent: an
    # older peer that does not say; migration then goes by the sha256 alone)
    state_keys: dict[str, EngineKey] = field(default_factory=dict)
    static_tags: tuple[str, ...] = ()  # tags config or the announcer gave every model
    configured_models: tuple[str, ...] = ()  # static peers: models from config, not polled
    strength: float | None = None
    queue_depth: int = 0
    slots: int = 1
    tools: frozenset[str] = frozenset()  # pcrt peers: the tools registered there, by name
    idempotent_tools: frozenset[str] = frozenset()  # of those, the ones safe to send twice
    on_battery: bool = False
    battery_percent: float | None = None
    device: dict[str, Any] = field(default_factory=dict)
    healthy: bool = False  # true only after a successful check
    latency_s: float | None = None
    failures: int = 0
    cooldown_until: float = 0.0
    next_check: float = 0.0
    last_seen: float | None = None  # wall clock of the last good answer
    last_error: str | None = None
    signature_ok: bool | None = None  # announced upstreams: the TXT signature verified
    probing: bool = False  # a health check is under way
    goodbye: bool = False  # mDNS said it left; it goes once a check fails
    slow_checks: int = 0  # health checks in a row that timed out (two are forgiven)

    @classmethod
    def from_static(cls, static: StaticPeer) -> Peer:
        """A peer from config, as the table first holds it (not checked yet)."""
        return cls(
            name=static.name,
            url=static.url.rstrip("/"),
            kind=static.kind,
            source="static",
            api_key_env=static.api_key_env,
            static_tags=static.tags,
            strength=static.strength,
            configured_models=static.models,
            # the user configured it: an OpenAI-compatible peer is trusted; a pcrt peer
            # still has to prove the cluster key
            trusted=static.kind != "pcrt",
            trust_note="configured",
        )

    def take_node_info(self, info: dict[str, Any]) -> None:
        """What a pcrt peer's ``/v1/pcrt/node`` says of it: id, models, load, battery,
        device. Raises ValueError or TypeError on a count that is not one."""
        self.node_id = info.get("node_id") or self.node_id
        self.models = offers_from_node_info(info)
        self.state_keys = state_keys_from_node_info(info)
        self.tools = _names(info.get("tools"))
        self.idempotent_tools = _names(info.get("idempotent_tools")) & self.tools
        self.queue_depth = int(info.get("queue_depth") or 0)
        self.slots = int(info.get("slots") or 1)
        battery = info.get("battery")
        battery = battery if isinstance(battery, dict) else {}
        self.battery_percent = reported_number(battery.get("percent"))
        self.on_battery = battery.get("plugged_in") is False
        device = info.get("device")
        self.device = device if isinstance(device, dict) else {}

    def in_rotation(self, now: float) -> bool:
        return self.trusted and self.healthy and now >= self.cooldown_until

    def view(self, now: float) -> NodeView:
        return NodeView(
            name=self.name,
            kind=self.kind,
            models=self.models,
            trusted=self.trusted,
            healthy=self.healthy and now >= self.cooldown_until,
            queue_depth=self.queue_depth,
            slots=max(1, self.slots),
            latency_s=self.latency_s or 0.0,
            on_battery=self.on_battery,
            battery_percent=self.battery_percent,
            tools=self.tools,
            idempotent_tools=self.idempotent_tools,
        )

    def describe(self, now: float) -> dict[str, Any]:
        """What ``pcrt peers`` and ``GET /v1/pcrt/peers`` show."""
        # liveness only; whether work may go there is in_rotation (trust and health)
        if self.failures:
            health = "cooldown"
        elif self.healthy:
            health = "healthy"
        else:
            health = "unknown"  # not checked yet
        return {
            "name": self.name,
            "url": self.url,
            "kind": self.kind,
            "source": self.source,
            "node_id": self.node_id,
            "trusted": self.trusted,
            "trust": self.trust_note,
            "health": health,
            "in_rotation": self.in_rotation(now),
            "models": [m.name for m in self.models],
            "tokens_per_s": {m.name: m.tokens_per_s for m in self.models if m.tokens_per_s},
            "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 2),
            "queue_depth": self.queue_depth,
            "failures": self.failures,
            "cooldown_s": round(max(0.0, self.cooldown_until - now), 2),
            "last_seen": self.last_seen,
            "last_error": self.last_error,
            "battery_percent": self.battery_percent,
        }


def offers_from_node_info(info: dict[str, Any]) -> tuple[ModelOffer, ...]:
    """A pcrt peer's ``/v1/pcrt/node`` models as policy offers; bad entries are skipped."""
    offers = []
    for m in info.get("models") or []:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            continue
        # a peer's numbers feed arithmetic in the policy: anything not a number is dropped
        offers.append(
            ModelOffer(
                name=m["name"],
                sha256=m["sha256"] if isinstance(m.get("sha256"), str) else None,
                aliases=_strings(m.get("aliases")),
                tags=_strings(m.get("tags")),
                context=_int(m.get("context")),
                size_bytes=_int(m.get("size_bytes")),
                strength=reported_number(m.get("strength")),
                tokens_per_s=reported_number(m.get("tokens_per_s")),
                prefill_tokens_per_s=reported_number(m.get("prefill_tokens_per_s")),
                loaded=m.get("loaded") is True,
            )
        )
    return tuple(offers)


def state_keys_from_node_info(info: dict[str, Any]) -> dict[str, EngineKey]:
    """The KV state keys a pcrt peer's node info reports, by model name."""
    keys = {}
    for m in info.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("name"), str):
            key = EngineKey.from_info(m.get("state_key"))
            if key is not None:
                keys[m["name"]] = key
    return keys


def reported_number(value: Any) -> float | None:
    """A number a peer reported, or None: policy arithmetic must not meet a string."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    return float(value) if ok else None


def reported_count(value: Any) -> int:
    """A token count a peer reported: anything but a positive int counts 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def offers_from_models(
    listing: dict[str, Any], tags: tuple[str, ...], strength: float | None
) -> tuple[ModelOffer, ...]:
    """An OpenAI-compatible ``/v1/models`` answer as offers (vLLM adds ``max_model_len``)."""
    offers = []
    for m in listing.get("data") or []:
        if isinstance(m, dict) and isinstance(m.get("id"), str):
            offers.append(
                ModelOffer(
                    name=m["id"],
                    tags=tags,
                    context=_int(m.get("max_model_len")),
                    strength=strength,
                    loaded=True,
                )
            )
    return tuple(offers)


class PeerTable:
    """Peers by name. Mutated only on the event loop (discovery callbacks, health checks)."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._peers

    def get(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def all(self) -> list[Peer]:
        return sorted(self._peers.values(), key=lambda p: p.name)

    def upsert(self, peer: Peer) -> Peer:
        """Add a peer, or refresh where it is; a known peer keeps its health and trust
        unless its address or identity changed (then it must prove itself again)."""
        old = self._peers.get(peer.name)
        if old is not None and (old.url, old.node_id, old.kind) == (
            peer.url,
            peer.node_id,
            peer.kind,
        ):
            merged = replace(
                old,
                static_tags=peer.static_tags,
                strength=peer.strength,
                configured_models=peer.configured_models,
                api_key_env=peer.api_key_env,
                signature_ok=peer.signature_ok,
            )
            self._peers[peer.name] = merged
            return merged
        self._peers[peer.name] = peer
        return peer

    @property
    def full(self) -> bool:
        """No room for another peer: a new mDNS sighting is ignored."""
        return len(self._peers) >= MAX_PEERS

    def remove(self, name: str) -> Peer | None:
        return self._peers.pop(name, None)

    def record_success(self, name: str, latency_s: float) -> None:
        peer = self._peers.get(name)
        if peer is None:
            return
        peer.healthy = True
        peer.failures = 0
        peer.cooldown_until = 0.0
        peer.latency_s = latency_s
        peer.last_seen = time.time()
        peer.last_error = None

    def record_failure(self, name: str, error: str, now: float) -> None:
        """Out of rotation at once; asked again after a backoff that doubles per failure."""
        peer = self._peers.get(name)
        if peer is None:
            return
        peer.failures += 1
        peer.healthy = False
        peer.last_error = error
        peer.cooldown_until = now + cooldown_seconds(peer.failures)
        peer.next_check = peer.cooldown_until

    def views(self, now: float) -> list[NodeView]:
        return [p.view(now) for p in self.all()]

    def due(self, now: float) -> list[Peer]:
        return [p for p in self.all() if p.next_check <= now]

    def all_checked(self) -> bool:
        """Every peer has passed or failed a health check."""
        return all(p.healthy or p.failures for p in self.all())

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [p.describe(now) for p in self.all()]

    def remote_names(self) -> tuple[set[str], set[str]]:
        """Model names (and aliases) and tags offered by trusted peers: a DAG may name them."""
        names: set[str] = set()
        tags: set[str] = set()
        for peer in self.all():
            if not peer.trusted:
                continue
            for offer in peer.models:
                names.add(offer.name)
                names.update(offer.aliases)
                tags.update(offer.tags)
        return names, tags

    def remote_tools(self) -> set[str]:
        """The tools trusted pcrt peers offer as idempotent: a DAG's tool and agent nodes
        may call them there (a non-idempotent one could be sent twice if a peer failed
        mid-call and the node went elsewhere, so it runs only where it is registered)."""
        return {t for peer in self.all() if peer.trusted for t in peer.idempotent_tools}


def _names(value: Any) -> frozenset[str]:
    """A node info's list of names, whatever a peer sent."""
    return (
        frozenset(v for v in value if isinstance(v, str))
        if isinstance(value, list)
        else frozenset()
    )
