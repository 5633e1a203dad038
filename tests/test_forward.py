"""The HTTP forwarder (``routing/forward.py``): SSE splitting (``sse_events``), requests
and streams against a stub peer on loopback, and the headers each kind of peer is sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from pcrt.routing.auth import (
    CLUSTER_HEADER,
    NonceCache,
    response_proof,
    verify_proof,
    verify_request,
)
from pcrt.routing.forward import ForwardedStream, Forwarder, PeerAnswer, sse_events
from pcrt.routing.peers import Peer
from pcrt.runtime.errors import Overloaded, PeerRejected, PeerUnavailable
from tests.live_server import free_port
from tests.routing_helpers import (
    BAD_REQUEST,
    KEY,
    STREAM_CHUNKS,
    Proof,
    StubServer,
)

# ---------------------------------------------------------------------------------------
# forward.py: sse_events
# ---------------------------------------------------------------------------------------


async def _aiter(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _events(parts: list[bytes]) -> list[tuple[bytes, bytes | None]]:
    return [event async for event in sse_events(_aiter(parts))]


STREAM_LF = (
    b'data: {"a": 1}\n\n: keep-alive\n\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n'
)
EXPECTED_LF = [
    (b'data: {"a": 1}\n\n', b'{"a": 1}'),
    (b": keep-alive\n\n", None),
    (b"event: x\ndata: line1\ndata: line2\n\n", b"line1\nline2"),
    (b"data: [DONE]\n\n", b"[DONE]"),
]


async def test_sse_events_from_one_chunk() -> None:
    assert await _events([STREAM_LF]) == EXPECTED_LF


async def test_sse_events_split_across_chunks_at_every_position() -> None:
    for cut in range(1, len(STREAM_LF)):
        parts = [STREAM_LF[:cut], STREAM_LF[cut:]]
        assert await _events(parts) == EXPECTED_LF, cut


async def test_sse_events_one_byte_at_a_time() -> None:
    parts = [STREAM_LF[i : i + 1] for i in range(len(STREAM_LF))]
    events = await _events(parts)
    assert events == EXPECTED_LF
    assert b"".join(raw for raw, _ in events) == STREAM_LF


async def test_sse_events_with_crlf_separators() -> None:
    stream = b'data: {"b": 2}\r\n\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\r\n\r\n'
    expected = [
        (b'data: {"b": 2}\r\n\r\n', b'{"b": 2}'),
        (b"data: one\r\ndata: two\r\n\r\n", b"one\ntwo"),
        (b"data: [DONE]\r\n\r\n", b"[DONE]"),
    ]
    assert await _events([stream]) == expected
    for cut in range(1, len(stream)):
        assert await _events([stream[:cut], stream[cut:]]) == expected, cut


async def test_sse_events_with_mixed_separators_keeps_order_and_bytes() -> None:
    stream = b"data: a\r\n\r\ndata: b\n\ndata: c\r\n\r\n"
    events = await _events([stream])
    assert [data for _, data in events] == [b"a", b"b", b"c"]
    assert b"".join(raw for raw, _ in events) == stream


async def test_sse_events_raw_parts_concatenate_to_the_input() -> None:
    stream = b'data: {"x": "\xc3\xa9"}\n\n\n\nid: 7\ndata:nospace\n\ndata: [DONE]\n\n'
    chunks = [stream[i : i + 5] for i in range(0, len(stream), 5)]
    events = await _events(chunks)
    assert b"".join(raw for raw, _ in events) == stream
    assert [d for _, d in events if d is not None] == [
        b'{"x": "\xc3\xa9"}',
        b"nospace",
        b"[DONE]",
    ]


async def test_sse_events_trailing_event_without_blank_line_is_still_yielded() -> None:
    events = await _events([b"data: first\n\n", b"data: last"])
    assert events == [(b"data: first\n\n", b"first"), (b"data: last", b"last")]


async def test_sse_events_of_an_empty_stream() -> None:
    assert await _events([]) == []
    assert await _events([b"", b""]) == []


async def test_sse_events_stop_consumer_at_done() -> None:
    """What remote.py does: read data payloads up to [DONE]."""
    payloads = []
    async for _, data in sse_events(_aiter([b"data: 1\n\ndata: 2\n", b"\ndata: [DONE]\n\n"])):
        if data == b"[DONE]":
            break
        payloads.append(data)
    assert payloads == [b"1", b"2"]


# ---------------------------------------------------------------------------------------
# forward.py: Forwarder against a real local HTTP server
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    with StubServer() as running:
        yield running


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fw = Forwarder(cluster_key=None, node_id="node-a")
    try:
        yield fw
    finally:
        await fw.close()


def _openai_peer(url: str, **kw: Any) -> Peer:
    return Peer(name="p", url=url, kind="openai", source="static", trusted=True, **kw)


async def test_request_200_is_a_peer_answer(server: StubServer, forwarder: Forwarder) -> None:
    answer = await forwarder.request(
        _openai_peer(server.url), "POST", "/echo", json_body={"model": "m"}
    )
    assert isinstance(answer, PeerAnswer)
    assert answer.status == 200
    echoed = answer.json()
    assert (echoed["method"], echoed["path"]) == ("POST", "/echo")
    assert echoed["body"].replace(" ", "") == '{"model":"m"}'
    assert echoed["forwarded_by"] == "node-a"
    assert echoed["cluster"] is None and echoed["authorization"] is None
    assert answer.sent_cluster_header is None
    assert answer.seconds > 0
    assert answer.headers["content-type"] == "application/json"


async def test_request_400_is_rejected_with_the_openai_error_body(
    server: StubServer, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerRejected) as caught:
        await forwarder.request(_openai_peer(server.url), "POST", "/bad", json_body={})
    assert caught.value.status == 400
    assert caught.value.body == BAD_REQUEST
    assert caught.value.peer == "p"
    assert "model 'nope' not found" in str(caught.value)


@pytest.mark.parametrize(("path", "detail"), [("/busy", "queue full"), ("/boom", "Internal")])
async def test_request_5xx_is_unavailable(
    server: StubServer, forwarder: Forwarder, path: str, detail: str
) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.request(_openai_peer(server.url), "GET", path)
    assert not isinstance(caught.value, PeerRejected)
    assert caught.value.peer == "p"
    assert "answered 5" in str(caught.value) and detail in str(caught.value)
    assert caught.value.status is not None  # it answered: not a lost connection


async def test_request_to_a_closed_port_is_unavailable(forwarder: Forwarder) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.request(_openai_peer(closed), "GET", "/v1/models")
    assert "did not answer" in str(caught.value)
    assert time.monotonic() - started < 2.0  # refused at once, no connect-timeout wait
    assert not caught.value.timed_out  # refused is a hard failure, never a forgiven slow one
    assert caught.value.status is None  # no answer at all
    assert "Timeout" not in str(caught.value)  # named as what happened, not the adapter's map


async def test_request_read_timeout_is_unavailable(
    server: StubServer, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.request(_openai_peer(server.url), "GET", "/slow", timeout=0.1)
    assert "Timeout" in str(caught.value)
    assert caught.value.timed_out


async def test_a_lost_peer_gives_up_its_long_calls_at_once(
    server: StubServer, forwarder: Forwarder
) -> None:
    peer = _openai_peer(server.url)
    other = Peer(name="q", url=server.url, kind="openai", source="static", trusted=True)
    slow = asyncio.ensure_future(
        forwarder.until_lost(peer, forwarder.request(peer, "GET", "/slow", timeout=30))
    )
    unrelated = asyncio.ensure_future(
        forwarder.until_lost(other, forwarder.request(other, "GET", "/slow", timeout=30))
    )
    await asyncio.sleep(0.2)  # both are waiting on the server
    started = time.monotonic()
    forwarder.lost("p")  # what the health checks call when p stops answering
    with pytest.raises(PeerUnavailable, match="stopped answering") as caught:
        await slow
    assert caught.value.peer == "p" and time.monotonic() - started < 1.0
    assert not unrelated.done()  # another peer's call goes on
    unrelated.cancel()
    # the next call on p waits for p again (lost is an event, not a verdict)
    answer = await forwarder.until_lost(peer, forwarder.request(peer, "GET", "/echo"))
    assert answer.status == 200


async def test_a_full_connection_pool_is_retry_later_not_the_peers_fault(
    server: StubServer,
) -> None:
    """Waiting for one of our own pooled connections is not the peer failing to connect:
    it says "try again", and the peer stays blameless."""
    fw = Forwarder(cluster_key=None, connect_timeout=0.2, max_connections=1)
    peer = _openai_peer(server.url)
    try:
        holding = asyncio.ensure_future(fw.request(peer, "GET", "/slow", timeout=30))
        await asyncio.sleep(0.1)  # the one connection is in use
        with pytest.raises(Overloaded, match="connections to peers are in use") as caught:
            await fw.request(peer, "GET", "/echo")
        assert caught.value.retry_after > 0
        assert (await holding).status == 200
        assert (await fw.request(peer, "GET", "/echo")).status == 200  # free again
    finally:
        await fw.close()


def test_timeout_reading_keeps_the_quick_connect() -> None:
    fw = Forwarder(cluster_key=None, connect_timeout=2.0)
    assert fw.timeout_reading(None) == aiohttp.ClientTimeout(
        total=None, connect=2.0, sock_connect=2.0, sock_read=None
    )
    assert fw.timeout_reading(90).sock_read == 90


async def test_request_to_a_pcrt_peer_carries_a_valid_cluster_signature(server: StubServer) -> None:
    fw = Forwarder(cluster_key=KEY)
    try:
        peer = Peer(name="p", url=server.url, kind="pcrt", source="static", trusted=True)
        answer = await fw.request(peer, "GET", "/echo")
    finally:
        await fw.close()
    received = answer.json()["cluster"]
    assert received is not None and received == answer.sent_cluster_header
    assert verify_request(KEY, received, "GET", "/echo", NonceCache()) is None
    # the proof a peer sends back for this exchange is checkable against what we sent
    proof = response_proof(KEY, received, answer.body)
    assert verify_proof(KEY, answer.sent_cluster_header or "", answer.body, proof)


@pytest.mark.parametrize(
    ("proof", "refusal"),
    [
        ("none", "without a cluster proof (X-PC-Cluster-Proof): a pcrt older than this one"),
        ("altered", "with a cluster proof that does not verify: the answer changed on the way"),
        ("other-key", "with a cluster proof that does not verify"),
        ("other-request", "with a cluster proof that does not verify"),
    ],
)
async def test_a_result_without_a_valid_proof_is_the_peers_failure(
    server: StubServer, proof: Proof, refusal: str
) -> None:
    """Results from a pcrt peer (``proven=True``) are taken only with the peer's proof over
    our request and the bytes as they arrived: an unproven answer (a pcrt of an older
    version), one changed on the way, one proven with another key or for another request
    is a failed peer's (the next candidate takes the work), never a result."""
    fw = Forwarder(cluster_key=KEY)
    peer = Peer(name="p", url=server.url, kind="pcrt", source="static", trusted=True)
    server.answers["/v1/pcrt/subgraphs"] = {"status": "succeeded", "nodes": {"a": {}}}
    try:
        answer = await fw.request(peer, "POST", "/v1/pcrt/subgraphs", json_body={}, proven=True)
        assert answer.json() == {"status": "succeeded", "nodes": {"a": {}}}
        server.proof = proof
        with pytest.raises(PeerUnavailable) as failed:
            await fw.request(peer, "POST", "/v1/pcrt/subgraphs", json_body={}, proven=True)
        assert refusal in str(failed.value)
        assert failed.value.cooldown and failed.value.peer == "p"
        assert failed.value.status == 200  # it answered: not a lost answer to resend
        # a caller that asks for no proof (a forwarded completion) still gets the answer
        await fw.request(peer, "POST", "/v1/pcrt/subgraphs", json_body={})
    finally:
        server.proof = "signed"
        await fw.close()


async def test_a_result_cannot_be_checked_without_a_cluster_key(server: StubServer) -> None:
    fw = Forwarder(cluster_key=None)
    peer = Peer(name="p", url=server.url, kind="pcrt", source="static", trusted=True)
    try:
        with pytest.raises(PeerUnavailable, match="no cluster key to check the answer"):
            await fw.request(peer, "POST", "/v1/pcrt/runs", json_body={}, proven=True)
    finally:
        await fw.close()


async def test_open_stream_yields_exactly_the_servers_bytes(
    server: StubServer, forwarder: Forwarder
) -> None:
    stream = await forwarder.open_stream(_openai_peer(server.url), "/stream", {"stream": True})
    assert isinstance(stream, ForwardedStream)
    assert stream.status == 200
    assert stream.media_type.startswith("text/event-stream")
    received = [chunk async for chunk in stream]
    assert b"".join(received) == b"".join(STREAM_CHUNKS)
    assert received[0]  # the first chunk was read before open_stream returned
    assert stream.closed


async def test_open_stream_through_sse_events(server: StubServer, forwarder: Forwarder) -> None:
    stream = await forwarder.open_stream(_openai_peer(server.url), "/stream", {})
    payloads = [data async for _, data in sse_events(aiter(stream))]
    assert payloads == [b'{"n": 1}', b'{"n": 2}', b"[DONE]"]


async def test_open_stream_fails_when_the_peer_dies_before_the_first_chunk(
    server: StubServer, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.open_stream(_openai_peer(server.url), "/stream-dies", {})
    assert caught.value.peer == "p" and not caught.value.timed_out
    # and the forwarder is still usable afterwards
    answer = await forwarder.request(_openai_peer(server.url), "GET", "/echo")
    assert answer.status == 200


async def test_open_stream_error_statuses(server: StubServer, forwarder: Forwarder) -> None:
    with pytest.raises(PeerRejected) as rejected:
        await forwarder.open_stream(_openai_peer(server.url), "/bad", {})
    assert (rejected.value.status, rejected.value.body) == (400, BAD_REQUEST)
    with pytest.raises(PeerUnavailable) as unavailable:
        await forwarder.open_stream(_openai_peer(server.url), "/busy", {})
    assert not isinstance(unavailable.value, PeerRejected)
    assert "queue full" in str(unavailable.value)


async def test_open_stream_to_a_closed_port_is_unavailable(forwarder: Forwarder) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PeerUnavailable) as caught:
        await forwarder.open_stream(_openai_peer(closed), "/stream", {})
    assert not caught.value.timed_out


# ---------------------------------------------------------------------------------------
# forward.py: headers_for (no network)
# ---------------------------------------------------------------------------------------


async def test_headers_for_a_pcrt_peer_sign_with_the_cluster_key() -> None:
    fw = Forwarder(cluster_key=KEY, node_id="edge-1")
    unsigned = Forwarder(cluster_key=None)
    try:
        peer = Peer(name="p", url="http://x:1", kind="pcrt", source="mdns", api_key_env="K")
        headers = fw.headers_for(peer, "post", "/v1/dag/run")
        assert headers["X-PC-Forwarded-By"] == "edge-1"
        assert "Authorization" not in headers  # a pcrt peer is never sent a bearer key
        signed = headers[CLUSTER_HEADER]
        assert verify_request(KEY, signed, "POST", "/v1/dag/run", NonceCache()) is None
        assert verify_request(KEY, signed, "POST", "/v1/other", NonceCache()) is not None
        assert unsigned.headers_for(peer, "GET", "/x") == {"X-PC-Forwarded-By": "pcrt"}
    finally:
        await fw.close()
        await unsigned.close()


async def test_headers_for_an_openai_peer_send_its_bearer_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTING_UNITS_KEY", "sk-secret")
    monkeypatch.delenv("ROUTING_UNITS_UNSET", raising=False)
    fw = Forwarder(cluster_key=KEY)
    try:
        with_key = _openai_peer("http://x:1", api_key_env="ROUTING_UNITS_KEY")
        headers = fw.headers_for(with_key, "POST", "/v1/chat/completions")
        assert headers["Authorization"] == "Bearer sk-secret"
        assert CLUSTER_HEADER not in headers  # the cluster key never goes to a foreign server
        unset = _openai_peer("http://x:1", api_key_env="ROUTING_UNITS_UNSET")
        assert "Authorization" not in fw.headers_for(unset, "POST", "/v1/chat/completions")
        assert "Authorization" not in fw.headers_for(_openai_peer("http://x:1"), "GET", "/")
    finally:
        await fw.close()


async def test_bearer_key_reaches_the_server(
    server: StubServer, forwarder: Forwarder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTING_UNITS_KEY", "sk-wire")
    peer = _openai_peer(server.url, api_key_env="ROUTING_UNITS_KEY")
    answer = await forwarder.request(peer, "GET", "/echo", headers={"X-Extra": "1"})
    assert answer.json()["authorization"] == "Bearer sk-wire"
