"""mDNS discovery: announce this node (or an upstream server) and see the others on the LAN.

Each node is one DNS-SD instance of ``_pcrt._tcp.local.`` (``pcrt announce --upstream URL``
adds one more instance per upstream). Three choices shape this module:

- The TXT record stays small (node id, API port, protocol version, kind, a hash of
  capabilities), as RFC 6763 advises: it travels in every announcement and answer, and
  nothing in it is trusted anyway. Anything bigger (models, load, device profile) comes
  from an authenticated HTTP call to the peer, made by the peer table, not here.
- Liveness comes from the peer table's health checks and failure cooldowns, not from mDNS.
  Record TTLs keep python-zeroconf's long defaults (minutes), so a silent peer lingers
  here until its records expire; a clean shutdown sends goodbye packets and is reported
  as ``"removed"`` at once. A "removed" is a hint, an "added" merely a candidate.
- Discovery runs only on the interfaces chosen in config (``[peers] interfaces``), IPv4
  only: a node on a café Wi-Fi must be able to keep it off that network, and tests pin it
  to 127.0.0.1 so that they never multicast on the machine's real interfaces.

``Discovery`` wraps one ``AsyncZeroconf``. Its browser handler is called synchronously by
zeroconf on the event loop: it starts a resolve task per event (references kept, cancelled
on close) and reports a ``Sighting`` to the ``on_change`` callback. Failures are logged and
swallowed, never raised into zeroconf.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from zeroconf import InterfaceChoice, InterfacesType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = [
    "MAX_TXT_BYTES",
    "PROTOCOL_VERSION",
    "RESOLVE_TIMEOUT_MS",
    "SERVICE_TYPE",
    "Change",
    "Discovery",
    "OnChange",
    "Sighting",
    "instance_label",
    "interfaces_setting",
    "txt_properties",
]

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_pcrt._tcp.local."
PROTOCOL_VERSION = "1"
MAX_TXT_BYTES = 400  # RFC 6763 6.2: keep the TXT record small, ideally under 400 bytes
RESOLVE_TIMEOUT_MS = 1500  # how long one resolve of a seen instance may wait for answers

_MAX_LABEL = 48  # leaves room in the 63-byte label for zeroconf's "-N" rename suffix
_NOT_LABEL = re.compile(r"[^a-z0-9]+")

Change = Literal["added", "updated", "removed"]


@dataclass(frozen=True)
class Sighting:
    """One instance of ``SERVICE_TYPE`` as seen on the LAN; nothing in it is verified."""

    instance: str  # full service instance name, e.g. "laptop-3f2a._pcrt._tcp.local."
    addresses: tuple[str, ...]  # IPv4 addresses, most recently announced first
    port: int
    properties: dict[str, str]  # the TXT record as str -> str (a key without value: "")

    @property
    def node_id(self) -> str | None:
        return self.properties.get("id")

    @property
    def url(self) -> str:
        """The base URL of the announced server (first address; "" if none is known)."""
        if not self.addresses:
            return ""
        return f"http://{self.addresses[0]}:{self.port}"


# Called on the event loop. For "removed" only `instance` is reliable (addresses empty, port 0).
OnChange = Callable[[Change, Sighting], None]


def txt_properties(
    *,
    node_id: str,
    port: int,
    kind: str = "pcrt",
    caps: str = "",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The TXT record of an announcement, checked to stay small.

    Raises ValueError if a key or value is not a str, a key is empty, not printable ASCII or
    holds "=", one ``key=value`` string exceeds 255 bytes, or the whole record exceeds
    ``MAX_TXT_BYTES`` once encoded.
    """
    props: dict[str, str] = {
        "id": node_id,
        "port": str(port),
        "proto": PROTOCOL_VERSION,
        "kind": kind,
        "caps": caps,
    }
    props.update(extra or {})
    total = 0
    for key, value in props.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"TXT keys and values must be str: {key!r}={value!r}")
        if not key or "=" in key or not all(0x20 <= ord(c) <= 0x7E for c in key):
            raise ValueError(f"invalid TXT key {key!r}: printable ASCII without '='")
        entry = len(key.encode()) + 1 + len(value.encode())
        if entry > 255:
            raise ValueError(f"TXT entry {key!r} is {entry} bytes (at most 255)")
        total += 1 + entry  # each string is preceded by its length byte
    if total > MAX_TXT_BYTES:
        raise ValueError(f"TXT record is {total} bytes (at most {MAX_TXT_BYTES}): keep it small")
    return props


def interfaces_setting(value: str | Sequence[str] | None) -> InterfacesType | None:
    """Where mDNS runs, from the ``[peers] interfaces`` setting; None means discovery off.

    ``"all"`` gives ``InterfaceChoice.All``; IPv4 addresses (a list, or one string, commas
    allowed) give that list; None, "" or [] give None. Raises ValueError on anything else.
    """
    if value is None:
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    if not items:
        return None
    if [str(item).strip().lower() for item in items] == ["all"]:
        return InterfaceChoice.All
    addresses: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"interface must be an IPv4 address string, not {item!r}")
        try:
            address = str(ipaddress.IPv4Address(item.strip()))
        except ValueError:
            raise ValueError(
                f'interfaces: expected "all" or IPv4 addresses, got {item!r}'
            ) from None
        if address not in addresses:
            addresses.append(address)
    return addresses


def instance_label(name: str) -> str:
    """``name`` as a DNS label: lowercase letters, digits and single hyphens, at most 48."""
    label = _NOT_LABEL.sub("-", name.lower()).strip("-")[:_MAX_LABEL].rstrip("-")
    return label or "pcrt"


def _decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    decoded: dict[str, str] = {}
    for key, value in properties.items():
        text_key = key.decode("utf-8", errors="replace")
        decoded[text_key] = "" if value is None else value.decode("utf-8", errors="replace")
    return decoded


class Discovery:
    """Announces services and browses ``SERVICE_TYPE`` on the given interfaces (IPv4 only).

    Use as ``async with Discovery(...) as d:`` or call ``start()`` and ``close()``. Events
    for instances this object registered are never reported. Per instance, the first
    report is always "added" and later ones "updated" (only when the sighting changed),
    whatever order zeroconf's events and resolves happen in.
    """

    def __init__(
        self, *, interfaces: InterfacesType, on_change: OnChange, browse: bool = True
    ) -> None:
        self._interfaces = interfaces
        self._on_change = on_change
        self._browse = browse
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered: dict[str, AsyncServiceInfo] = {}  # lowercased instance -> info
        self._pending: dict[str, asyncio.Task[None]] = {}  # lowercased instance -> resolve
        self._tasks: set[asyncio.Task[None]] = set()  # every running resolve task
        self._reported: dict[str, Sighting] = {}  # lowercased instance -> last reported
        self._closed = False

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def instances(self) -> tuple[str, ...]:
        """The instance names this object has registered (as actually registered)."""
        return tuple(info.name for info in self._registered.values())

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("Discovery is closed")
        if self._aiozc is not None:
            return
        self._aiozc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        if self._browse:
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
            )

    async def announce(
        self, *, name: str, address: str, port: int, properties: Mapping[str, str]
    ) -> str:
        """Register ``{label}.{SERVICE_TYPE}`` at ``address:port`` with TXT ``properties``.

        ``name`` is made a DNS label; on a clash with another node's instance zeroconf
        appends "-2", "-3", ... Returns the instance name actually registered, once it is
        probed (about 1.2 s) and announced. Can be called for several services.
        """
        aiozc = self._require_started()
        parsed = str(ipaddress.IPv4Address(address))  # ValueError if not an IPv4 address
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        label = instance_label(name)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=port,
            properties=dict(properties),
            # one host name per announcement: two nodes (or two upstreams) that share a
            # name must not answer for the same A record
            server=f"{label}-{secrets.token_hex(4)}.local.",
            parsed_addresses=[parsed],
        )
        broadcast = await aiozc.async_register_service(info, allow_name_change=True)
        # the name is final once probing is done; record it before our own announcement
        # comes back to our browser
        self._registered[info.name.lower()] = info
        await broadcast
        logger.info("announced %s at %s:%d", info.name, parsed, port)
        return info.name

    async def update(self, instance: str, properties: Mapping[str, str]) -> None:
        """Re-announce a registered instance with a new TXT record (peers see "updated")."""
        aiozc = self._require_started()
        old = self._registered.get(instance.lower())
        if old is None:
            raise KeyError(f"not registered here: {instance}")
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            old.name,
            port=old.port,
            properties=dict(properties),
            server=old.server,
            addresses=old.addresses_by_version(IPVersion.V4Only),
        )
        self._registered[instance.lower()] = info
        await (await aiozc.async_update_service(info))

    async def close(self) -> None:
        """Stop browsing, send goodbyes for every registered instance, close zeroconf."""
        if self._closed:
            return
        self._closed = True
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pending.clear()
        if self._aiozc is not None:
            await self._aiozc.async_close()  # goodbye packets for all registered services
            self._aiozc = None
        self._registered.clear()
        self._reported.clear()

    def _require_started(self) -> AsyncZeroconf:
        if self._aiozc is None or self._closed:
            raise RuntimeError("Discovery is not started (or already closed)")
        return self._aiozc

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called synchronously by zeroconf on the event loop: never block, never raise.
        key = name.lower()
        if self._closed or key in self._registered:
            return
        previous = self._pending.pop(key, None)
        if previous is not None:
            previous.cancel()  # a newer event supersedes it: resolve once, from fresh records
        if state_change is ServiceStateChange.Removed:
            self._reported.pop(key, None)
            self._emit("removed", Sighting(name, (), 0, {}))
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
        self._pending[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        key = name.lower()
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            found = await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS)
            addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
            if not found or info.port is None or not addresses:
                logger.warning("could not resolve %s (no answer, port or IPv4 address)", name)
                return
            sighting = Sighting(name, addresses, info.port, _decode_txt(info.properties))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("resolving %s failed", name)
            return
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]
        if self._closed or key in self._registered:
            return
        last = self._reported.get(key)
        if last == sighting:
            return  # e.g. a refreshed A record with the same address: nothing new to tell
        self._reported[key] = sighting
        self._emit("added" if last is None else "updated", sighting)

    def _emit(self, change: Change, sighting: Sighting) -> None:
        try:
            self._on_change(change, sighting)
        except Exception:
            logger.exception("discovery callback failed on %s %s", change, sighting.instance)
