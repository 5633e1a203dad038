"""Moving a run to a peer (``routing/migrate.py``): which states are left behind, the run
record sent again when its answer was lost (the peer is a fake forwarder), and the peer's
acknowledgements taken only proven with the cluster key (a stub peer on loopback)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcrt.cache.async_runs import AsyncRunStore
from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.forward import Forwarder, PeerAnswer
from pcrt.routing.migrate import BLOBS_PATH, RUNS_PATH, migrate_run, refusal_of
from pcrt.routing.peers import Peer
from pcrt.routing.policy import ModelOffer
from pcrt.routing.settings import PeerSettings
from pcrt.routing.statekey import EngineKey
from pcrt.runtime.engine.state import CompatKey, KVState, StateHeader
from pcrt.runtime.errors import PeerUnavailable
from tests.routing_helpers import (
    HERE_KEY,
    KEY,
    MODEL_SHA,
    Proof,
    StubServer,
    bare_coordinator,
    mdns_peer,
)


def _header(model: str = "smollm", key: CompatKey = HERE_KEY) -> StateHeader:
    return StateHeader(
        key=key, model=model, n_tokens=3, next_token=None, payload_bytes=1, payload_sha256="0" * 64
    )


def test_refusal_of_a_state_by_model_and_by_engine_key() -> None:
    offer = ModelOffer(name="smollm", sha256=MODEL_SHA)
    q8 = EngineKey(type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert refusal_of(_header(), mdns_peer(models=())) == "the peer lacks model smollm"
    # an older peer says nothing of its engines: the sha256 decides, as it did
    assert refusal_of(_header(), mdns_peer(models=(offer,))) is None
    refused = refusal_of(_header(), mdns_peer(models=(offer,), state_keys={"smollm": q8}))
    assert refused == (
        "the peer's KV cache differs (here vs there): K type f16 vs q8_0, V type f16 vs q8_0, "
        "flash attention off vs on"
    )
    ok = EngineKey.of(HERE_KEY, parallel=4)
    assert refusal_of(_header(), mdns_peer(models=(offer,), state_keys={"smollm": ok})) is None
    # the same file under two names: the state's own name decides when the peer has it
    twin = ModelOffer(name="twin", sha256=MODEL_SHA)
    keys = {"smollm": q8, "twin": ok}
    assert refusal_of(_header(), mdns_peer(models=(offer, twin), state_keys=keys)) is not None
    assert refusal_of(_header("other"), mdns_peer(models=(offer, twin), state_keys=keys)) is None


class _FakePeerCalls:
    """Stands in for ``Forwarder.request``: records calls; the record POST fails as told."""

    def __init__(self, post_failures: list[PeerUnavailable]) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.post_failures = post_failures

    async def __call__(self, peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        self.calls.append((method, path, kw.get("json_body") if method == "POST" else kw))
        if method == "POST" and self.post_failures:
            raise self.post_failures.pop(0)
        if method == "POST":
            body = {"id": kw["json_body"]["run"]["id"], "status": "running"}
        else:  # a state stored: pcrt acknowledges it by its id
            body = {"id": kw["content_sha256"], "size": 1}
        return PeerAnswer(200, httpx.Headers(), json.dumps(body).encode(), None, 0.0)


PeerCall = Callable[..., Awaitable[PeerAnswer]]


class _FakeForwarder(Forwarder):
    """The coordinator's forwarder without the network: each request goes to ``answer``."""

    def __init__(self) -> None:
        super().__init__(cluster_key=None)
        self.answer: PeerCall = _FakePeerCalls([])

    async def request(self, peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        return await self.answer(peer, method, path, **kw)


MigrationSetup = tuple[Coordinator, _FakeForwarder, RunStore, BlobStore]


@pytest.fixture
async def migration_setup(store: Store, tmp_path: Path) -> AsyncIterator[MigrationSetup]:
    """A run with one finished node's state, and a coordinator whose only peer is "p",
    reached through a fake forwarder."""
    runs, blobs = RunStore(store), BlobStore(store, tmp_path / "blobs")
    runs.create_run("r", "/dynamic/t", {"dag": "/dynamic/t"}, {}, [("a", "/dynamic/t/a", "llm")])
    state = KVState(HERE_KEY, [1, 2, 3], 4, b"kv" * 32, model="smollm").to_bytes()
    runs.patch_node(
        "r",
        "a",
        status="succeeded",
        state_sha256=blobs.put(state, run_id="r"),
        model="smollm",
        output="hi",
    )
    forwarder = _FakeForwarder()
    coordinator = bare_coordinator(PeerSettings(), node_name="here", forwarder=forwarder)
    try:
        yield coordinator, forwarder, runs, blobs
    finally:
        await coordinator.close()


def _lost(**kw: Any) -> PeerUnavailable:
    return PeerUnavailable("peer p did not answer POST /v1/pcrt/runs", peer="p", **kw)


async def test_migrate_leaves_a_state_the_peers_engine_would_refuse(
    migration_setup: MigrationSetup,
) -> None:
    coordinator, forwarder, runs, blobs = migration_setup
    q8 = EngineKey(type_k="q8_0", type_v="q8_0", flash_attn=True)
    coordinator.table.upsert(
        mdns_peer(
            trusted=True, models=(ModelOffer("smollm", MODEL_SHA),), state_keys={"smollm": q8}
        )
    )
    calls = _FakePeerCalls([])
    forwarder.answer = calls
    result = await migrate_run(coordinator, AsyncRunStore(runs), blobs, "r", "p")
    assert result.states_sent == 0 and len(result.states_left) == 1
    assert "K type f16 vs q8_0" in result.states_left[0]
    assert [c[:2] for c in calls.calls] == [("POST", RUNS_PATH)]  # no state sent
    assert calls.calls[0][2]["nodes"][0]["state_sha256"] is None  # the peer recomputes


async def test_migrate_sends_the_record_again_when_its_answer_was_lost(
    migration_setup: MigrationSetup,
) -> None:
    coordinator, forwarder, runs, blobs = migration_setup
    coordinator.table.upsert(
        mdns_peer(
            trusted=True,
            models=(ModelOffer("smollm", MODEL_SHA),),
            state_keys={"smollm": EngineKey.of(HERE_KEY, 4)},
        )
    )
    calls = _FakePeerCalls([_lost(timed_out=True)])
    forwarder.answer = calls
    result = await migrate_run(coordinator, AsyncRunStore(runs), blobs, "r", "p")
    assert result.states_sent == 1 and result.peer_status == "running"
    sha = runs.node("r", "a").state_sha256
    # the state goes from its file, signed over its name (the peer checks the body)
    assert [c[:2] for c in calls.calls] == [
        ("PUT", f"{BLOBS_PATH}?run_id=r&sha256={sha}"),
        ("POST", RUNS_PATH),
        ("POST", RUNS_PATH),
    ]
    sent = calls.calls[0][2]
    assert sent["content"] == blobs.path_of(sha or "") and sent["content_sha256"] == sha
    assert calls.calls[1][2] == calls.calls[2][2]  # the same record, byte for byte

    # an answered error is not asked twice, and a second lost answer is the failure
    for failures, posts in (([_lost(status=503)], 1), ([_lost(), _lost()], 2)):
        calls = _FakePeerCalls(failures)
        forwarder.answer = calls
        with pytest.raises(PeerUnavailable):
            await migrate_run(coordinator, AsyncRunStore(runs), blobs, "r", "p")
        assert [c[0] for c in calls.calls].count("POST") == posts

    # a 200 whose body is not JSON is no pcrt peer's answer: unavailable, not a crash
    async def html(peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        if method == "PUT":  # the state was stored; the record's answer is the portal's
            return await _FakePeerCalls([])(peer, method, path, **kw)
        return PeerAnswer(200, httpx.Headers(), b"<html>captive portal</html>", None, 0.0)

    forwarder.answer = html
    with pytest.raises(PeerUnavailable, match="did not take run r"):
        await migrate_run(coordinator, AsyncRunStore(runs), blobs, "r", "p")
    # and the record says who sent it by node id, unique where hostnames may not be
    assert calls.calls[-1][2]["origin"] == "n"


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    with StubServer() as running:
        yield running


@pytest.mark.parametrize(
    ("proof", "blob_ack", "with_states", "sent", "refusal"),
    [
        # a pcrt of an older version: its blob acknowledgement has no proof
        ("none", None, True, ["PUT"], "without a cluster proof"),
        # a proven acknowledgement of some other state
        ("signed", {"id": "ef" * 32, "size": 1}, True, ["PUT"], "did not acknowledge state"),
        # the record's answer changed on the way: refused, and not sent again
        ("altered", None, False, ["POST"], "does not verify"),
        ("other-request", None, False, ["POST"], "does not verify"),
    ],
)
async def test_a_move_takes_only_proven_acknowledgements(
    migration_setup: MigrationSetup,
    server: StubServer,
    proof: Proof,
    blob_ack: dict[str, Any] | None,
    with_states: bool,
    sent: list[str],
    refusal: str,
) -> None:
    """The peer's word that it stored a state and took the run is what lets the source
    mark its run migrated: an unproven or changed one fails the move (the run stays
    resumable here), and a record is not sent on after a state the peer did not prove."""
    coordinator, forwarder, runs, blobs = migration_setup
    coordinator.table.upsert(
        mdns_peer(
            url=server.url,
            trusted=True,
            models=(ModelOffer("smollm", MODEL_SHA),),
            state_keys={"smollm": EngineKey.of(HERE_KEY, 4)},
        )
    )
    real = Forwarder(cluster_key=KEY)
    methods: list[str] = []

    async def over_http(peer: Peer, method: str, path: str, **kw: Any) -> PeerAnswer:
        methods.append(method)
        return await real.request(peer, method, path, **kw)

    forwarder.answer = over_http
    server.answers[RUNS_PATH] = {"id": "r", "status": "running", "url": "/v1/dags/r"}
    try:
        moved = await migrate_run(coordinator, AsyncRunStore(runs), blobs, "r", "p")
        assert moved.states_sent == 1 and moved.peer_status == "running"
        assert methods == ["PUT", "POST"]
        methods.clear()
        server.proof = proof
        if blob_ack is not None:
            server.answers[BLOBS_PATH] = blob_ack
        with pytest.raises(PeerUnavailable, match=refusal):
            await migrate_run(
                coordinator, AsyncRunStore(runs), blobs, "r", "p", with_states=with_states
            )
        assert methods == sent
    finally:
        server.proof = "signed"
        server.answers.pop(BLOBS_PATH, None)
        await real.close()
