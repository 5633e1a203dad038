"""mDNS discovery between two ``Discovery`` objects in one process, pinned to 127.0.0.1.

Every zeroconf here runs on 127.0.0.1 only (IPv4): the tests never multicast on the
machine's real interfaces. Each test uses fresh names and node ids, so leftovers of another
test (records cached until their goodbye) never match.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from zeroconf import InterfaceChoice

from pcrt.routing.discovery import (
    MAX_TXT_BYTES,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Change,
    Discovery,
    Sighting,
    instance_label,
    interfaces_setting,
    txt_properties,
)

LOOPBACK = ["127.0.0.1"]
TIMEOUT = 6.0  # registration probes for about 1.2 s; resolve answers come at once


class Events:
    """An ``on_change`` callback that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[tuple[Change, Sighting, float]] = []
        self._changed = asyncio.Event()

    def __call__(self, change: Change, sighting: Sighting) -> None:
        self.seen.append((change, sighting, time.monotonic()))
        self._changed.set()

    def of(self, change: Change, match: Callable[[Sighting], bool]) -> list[Sighting]:
        return [s for c, s, _ in self.seen if c == change and match(s)]

    async def wait(
        self, change: Change, match: Callable[[Sighting], bool], timeout: float = TIMEOUT
    ) -> tuple[Sighting, float]:
        async def poll() -> tuple[Sighting, float]:
            while True:
                for c, s, at in self.seen:
                    if c == change and match(s):
                        return s, at
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(poll(), timeout)


def node(prefix: str = "node") -> tuple[str, str]:
    """A fresh (name, node id) pair."""
    suffix = uuid.uuid4().hex[:8]
    return f"{prefix}-{suffix}", f"id-{suffix}"


def by_id(node_id: str) -> Callable[[Sighting], bool]:
    return lambda s: s.node_id == node_id


def by_instance(instance: str) -> Callable[[Sighting], bool]:
    return lambda s: s.instance.lower() == instance.lower()


async def test_added_updated_removed() -> None:
    name, node_id = node()
    up_name, up_id = node("upstream")
    events_a, events_b = Events(), Events()
    b = Discovery(interfaces=LOOPBACK, on_change=events_b)
    await b.start()
    try:
        async with Discovery(interfaces=LOOPBACK, on_change=events_a) as a:
            props = txt_properties(node_id=node_id, port=18080, caps="abc123")
            up_props = txt_properties(node_id=up_id, port=8000, kind="vllm")
            started = time.monotonic()
            instance, up_instance = await asyncio.gather(
                a.announce(name=name, address="127.0.0.1", port=18080, properties=props),
                a.announce(name=up_name, address="127.0.0.1", port=8000, properties=up_props),
            )
            assert instance == f"{name}.{SERVICE_TYPE}"
            assert up_instance == f"{up_name}.{SERVICE_TYPE}"
            assert set(a.instances) == {instance, up_instance}

            seen, at = await events_b.wait("added", by_id(node_id))
            assert at - started < TIMEOUT
            assert seen.instance == instance
            assert seen.addresses == ("127.0.0.1",)
            assert seen.port == 18080
            assert seen.properties == props
            assert seen.url == "http://127.0.0.1:18080"
            upstream, _ = await events_b.wait("added", by_id(up_id))
            assert (upstream.instance, upstream.port) == (up_instance, 8000)
            assert upstream.properties["kind"] == "vllm"

            new_props = txt_properties(node_id=node_id, port=18080, caps="def456")
            await a.update(instance, new_props)
            updated, _ = await events_b.wait("updated", by_instance(instance))
            assert updated.properties == new_props
            assert (updated.addresses, updated.port) == (("127.0.0.1",), 18080)

            closing = time.monotonic()
        removed, at = await events_b.wait("removed", by_instance(instance), timeout=2.0)
        assert at - closing < 1.0  # the goodbye, not a TTL expiry
        assert removed.addresses == () and removed.port == 0
        await events_b.wait("removed", by_instance(up_instance), timeout=2.0)
        # A browsed too, but never reported its own instances
        assert not [s for _, s, _ in events_a.seen if s.node_id in (node_id, up_id)]
        assert not events_a.of("removed", lambda s: s.instance in (instance, up_instance))
        # each instance was added once, then updated only by the real TXT change
        assert len(events_b.of("added", by_instance(instance))) == 1
        assert len(events_b.of("updated", by_instance(instance))) == 1
    finally:
        await b.close()


async def test_same_name_coexists_and_own_instances_are_skipped() -> None:
    name, id_a = node()
    id_b = f"{id_a}-b"
    events_a, events_b = Events(), Events()
    async with (
        Discovery(interfaces=LOOPBACK, on_change=events_a) as a,
        Discovery(interfaces=LOOPBACK, on_change=events_b) as b,
    ):
        inst_a = await a.announce(
            name=name,
            address="127.0.0.1",
            port=1001,
            properties=txt_properties(node_id=id_a, port=1001),
        )
        inst_b = await b.announce(
            name=name,
            address="127.0.0.1",
            port=1002,
            properties=txt_properties(node_id=id_b, port=1002),
        )
        assert inst_a == f"{name}.{SERVICE_TYPE}"
        assert inst_b == f"{name}-2.{SERVICE_TYPE}"  # renamed by probing, not refused

        seen_by_a, _ = await events_a.wait("added", by_id(id_b))
        seen_by_b, _ = await events_b.wait("added", by_id(id_a))
        assert (seen_by_a.instance, seen_by_a.port) == (inst_b, 1002)
        assert (seen_by_b.instance, seen_by_b.port) == (inst_a, 1001)
        await asyncio.sleep(0.3)  # let any late self-sighting arrive
        assert not events_a.of("added", by_id(id_a))
        assert not events_b.of("added", by_id(id_b))


async def test_callback_errors_are_swallowed() -> None:
    name, node_id = node()
    events = Events()

    def failing(change: Change, sighting: Sighting) -> None:
        events(change, sighting)
        raise RuntimeError("a broken peer table")

    async with (
        Discovery(interfaces=LOOPBACK, on_change=failing) as b,
        Discovery(interfaces=LOOPBACK, on_change=Events(), browse=False) as a,
    ):
        assert b is not None
        props = txt_properties(node_id=node_id, port=2000)
        instance = await a.announce(name=name, address="127.0.0.1", port=2000, properties=props)
        await events.wait("added", by_id(node_id))
        await a.update(instance, {**props, "caps": "x"})
        await events.wait("updated", by_instance(instance))


async def test_close_is_idempotent_and_safe_before_start() -> None:
    never_started = Discovery(interfaces=LOOPBACK, on_change=Events())
    await never_started.close()
    await never_started.close()
    with pytest.raises(RuntimeError):
        await never_started.start()

    d = Discovery(interfaces=LOOPBACK, on_change=Events(), browse=False)
    with pytest.raises(RuntimeError):
        await d.announce(name="x", address="127.0.0.1", port=1, properties={})
    await d.start()
    with pytest.raises(ValueError):
        await d.announce(name="x", address="not-an-ip", port=1, properties={})
    with pytest.raises(ValueError):
        await d.announce(name="x", address="127.0.0.1", port=0, properties={})
    with pytest.raises(KeyError):
        await d.update(f"nobody.{SERVICE_TYPE}", {})
    await d.close()
    await d.close()


def test_txt_properties_contents() -> None:
    props = txt_properties(node_id="n1", port=11435, caps="9f2c", extra={"sig": "abc", "f": ""})
    assert props == {
        "id": "n1",
        "port": "11435",
        "proto": PROTOCOL_VERSION,
        "kind": "pcrt",
        "caps": "9f2c",
        "sig": "abc",
        "f": "",
    }
    assert txt_properties(node_id="n1", port=1, kind="vllm")["kind"] == "vllm"


def test_txt_properties_size_limit() -> None:
    txt_properties(node_id="n", port=1, extra={"a": "x" * 200, "b": "y" * 100})  # under 400
    with pytest.raises(ValueError, match="at most 400"):
        txt_properties(node_id="n", port=1, extra={"a": "x" * 200, "b": "y" * 200})
    assert MAX_TXT_BYTES == 400
    with pytest.raises(ValueError, match="255"):
        txt_properties(node_id="n", port=1, caps="c" * 260)
    with pytest.raises(ValueError, match="str"):
        txt_properties(node_id="n", port=1, extra={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="key"):
        txt_properties(node_id="n", port=1, extra={"a=b": "c"})
    with pytest.raises(ValueError, match="key"):
        txt_properties(node_id="n", port=1, extra={"": "c"})
    # multi-byte utf-8 counts in bytes
    with pytest.raises(ValueError, match="at most 400"):
        txt_properties(node_id="n", port=1, extra={"a": "é" * 120, "b": "é" * 100})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", InterfaceChoice.All),
        ("ALL", InterfaceChoice.All),
        (["all"], InterfaceChoice.All),
        (["127.0.0.1"], ["127.0.0.1"]),
        (["192.168.1.20", "10.0.0.2"], ["192.168.1.20", "10.0.0.2"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("127.0.0.1, 10.0.0.2", ["127.0.0.1", "10.0.0.2"]),
        (["127.0.0.1", "127.0.0.1"], ["127.0.0.1"]),
        (None, None),
        ([], None),
        ("", None),
    ],
)
def test_interfaces_setting(value: str | list[str] | None, expected: object) -> None:
    assert interfaces_setting(value) == expected


@pytest.mark.parametrize("value", ["eth0", ["all", "127.0.0.1"], ["::1"], ["127.0.0.256"]])
def test_interfaces_setting_rejects(value: str | list[str]) -> None:
    with pytest.raises(ValueError):
        interfaces_setting(value)


def test_instance_label_and_sighting() -> None:
    assert instance_label("My Laptop (2)") == "my-laptop-2"
    assert instance_label("gpu_box.lan") == "gpu-box-lan"
    assert instance_label("---") == "pcrt"
    assert len(instance_label("x" * 100)) == 48
    s = Sighting(f"a.{SERVICE_TYPE}", ("10.0.0.2", "10.0.0.3"), 8000, {"id": "n1"})
    assert (s.node_id, s.url) == ("n1", "http://10.0.0.2:8000")
    assert Sighting(f"a.{SERVICE_TYPE}", (), 0, {}).node_id is None
