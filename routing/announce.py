"""Announcing an OpenAI-compatible server that is not pcrt (a vLLM box) as a LAN peer.

``pcrt announce --upstream URL`` reads the upstream's models from its ``/v1/models`` and
announces it as ``_pcrt._tcp.local.`` with ``kind=vllm`` or ``openai``, so edge daemons
find it like any peer. The TXT record carries the upstream's address and a signature made
with the cluster key (``auth.announcement_signature``): a daemon with the same key trusts
the announcement; one without it sees the server but never sends it work. The upstream's
own API key is never announced, only the name of the env var that holds it on each edge.

The announcer keeps checking the upstream: when its models change the TXT record is
updated (peers re-read ``/v1/models``); on exit it says goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from zeroconf import InterfacesType

from pcrt.routing.auth import announcement_signature
from pcrt.routing.discovery import Discovery, Sighting, txt_properties
from pcrt.routing.identity import capabilities_hash
from pcrt.runtime.errors import ConfigError, PeerUnavailable

__all__ = ["Upstream", "announce_upstream", "fetch_models", "upstream_txt"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upstream:
    url: str  # base URL, e.g. http://10.0.0.5:8000 (a path prefix before /v1 is allowed)
    name: str
    kind: str = "vllm"  # vllm | openai
    api_key_env: str | None = None
    tags: tuple[str, ...] = ()
    strength: float | None = None

    @property
    def address_and_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"--upstream must be an http:// URL with a host (got {self.url})")
        port = parts.port or 80
        try:
            return socket.gethostbyname(parts.hostname), port
        except OSError as exc:
            raise ConfigError(f"cannot resolve {parts.hostname}: {exc}") from None

    @property
    def path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")


async def fetch_models(client: httpx.AsyncClient, upstream: Upstream) -> list[str]:
    headers = {}
    if upstream.api_key_env and os.environ.get(upstream.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[upstream.api_key_env]}"
    try:
        response = await client.get(upstream.url.rstrip("/") + "/v1/models", headers=headers)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise PeerUnavailable(
            f"{upstream.url}/v1/models did not answer with a model list: {exc}",
            peer=upstream.name,
        ) from None
    models = [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
    if not models:
        raise PeerUnavailable(f"{upstream.url} serves no models", peer=upstream.name)
    return models


def upstream_txt(upstream: Upstream, models: list[str], cluster_key: str | None) -> dict[str, str]:
    address, port = upstream.address_and_port
    node_id = hashlib.sha256(f"{address}:{port}{upstream.path}".encode()).hexdigest()[:16]
    extra = {"tags": ",".join(upstream.tags)}
    if upstream.path:
        extra["path"] = upstream.path
    if upstream.api_key_env:
        extra["keyenv"] = upstream.api_key_env
    if upstream.strength is not None:
        extra["strength"] = f"{upstream.strength:g}"
    fields = txt_properties(
        node_id=node_id,
        port=port,
        kind=upstream.kind,
        caps=capabilities_hash(models),
        extra=extra,
    )
    if cluster_key:
        fields["sig"] = announcement_signature(cluster_key, address, port, fields)
    return fields


async def announce_upstream(
    upstream: Upstream,
    *,
    interfaces: InterfacesType,
    cluster_key: str | None,
    stop: asyncio.Event,
    refresh: float = 10.0,
    on_models: Callable[[list[str]], None] | None = None,
) -> None:
    """Announce until ``stop`` is set; re-read the upstream's models every ``refresh`` s."""
    address, port = upstream.address_and_port
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        models = await fetch_models(client, upstream)
        if on_models is not None:
            on_models(models)
        discovery = Discovery(interfaces=interfaces, on_change=_ignore, browse=False)
        async with discovery:
            instance = await discovery.announce(
                name=upstream.name,
                address=address,
                port=port,
                properties=upstream_txt(upstream, models, cluster_key),
            )
            log.info("announced %s as %s", upstream.url, instance)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), refresh)
                if stop.is_set():
                    break
                try:
                    fresh = await fetch_models(client, upstream)
                except PeerUnavailable as exc:
                    log.warning("%s (still announced; edge daemons check it themselves)", exc)
                    continue
                if fresh != models:
                    models = fresh
                    if on_models is not None:
                        on_models(models)
                    await discovery.update(instance, upstream_txt(upstream, models, cluster_key))


def _ignore(_change: str, _sighting: Sighting) -> None:
    return None  # the announcer does not browse
