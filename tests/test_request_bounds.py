"""Request bodies cost nothing before the request proved who sent it, and no more than
their route's bound after (issue 16, item 3).

The guard reads the key from the headers: a 300 MB POST without it is a 401 sent before
the client sent its body, and the daemon (in this process) grows by a few MB at most. A
body over its route's bound is a 413, before a byte is read when the Content-Length says
so, and the moment it passes the bound when it is chunked. The client here is a raw socket
that sends the body from one reused buffer, so its own memory does not count.

On the fake engine (``tests/fakes.py``): no request gets as far as a model.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from pcrt.routing.auth import CLUSTER_HEADER, MAX_SKEW, request_header
from pcrt.routing.settings import PeerSettings
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.health_probe import HealthProbe
from tests.live_server import LiveServer, ServerFactory

KEY = "request-bounds-key"
CLUSTER_KEY = "request-bounds-cluster"
MiB = 1024**2
HUGE = 300 * 1000**2  # the probe's 300 MB
PIECE = b"a" * MiB  # every piece of every body sent: the client allocates it once
CHAT_PREFIX = (
    b'{"model": "smollm2-135m", "max_tokens": 2, "messages": [{"role": "user", "content": "'
)
CHAT_SUFFIX = b'"}]}'
MAX_GROWTH = 100 * MiB


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(
        api_key=KEY,
        peers=PeerSettings(cluster_key=CLUSTER_KEY),
        peer_max_body_bytes=MiB,
    )
    return module_live_server(settings, opener=FakeEngines())


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # bytes of the body the client got to send before the answer came

    def error(self) -> dict[str, str]:
        error: dict[str, str] = json.loads(self.body)["error"]
        return error


def _body_pieces(size: int) -> Iterator[bytes]:
    """A chat request's JSON of ``size`` bytes, in pieces of at most a MiB."""
    yield CHAT_PREFIX
    left = size - len(CHAT_PREFIX) - len(CHAT_SUFFIX)
    while left > 0:
        piece = PIECE if left >= len(PIECE) else PIECE[:left]
        left -= len(piece)
        yield piece
    yield CHAT_SUFFIX


def post_raw(
    server: LiveServer,
    path: str,
    size: int,
    *,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    wait: float = 2.0,
) -> Answer:
    """POST a body of ``size`` bytes the way a client that does not wait would: the head,
    then (unless an answer came within ``wait`` seconds) the body a piece at a time,
    stopping when the daemon answers or closes; then the answer."""
    url = urlsplit(server.url)
    assert url.hostname is not None and url.port is not None
    lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

        def answered(timeout: float) -> bool:
            return bool(select.select([sock], [], [], timeout)[0])

        if not answered(wait):
            try:
                for piece in _body_pieces(size):
                    if answered(0):
                        break
                    framed = (
                        [f"{len(piece):x}\r\n".encode(), piece, b"\r\n"] if chunked else [piece]
                    )
                    for part in framed:
                        sock.sendall(part)
                    sent += len(piece)
                else:
                    if chunked:
                        sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the daemon closed the connection: its answer is waiting
        return _read_answer(sock, sent)


def _read_answer(sock: socket.socket, sent: int) -> Answer:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"the daemon closed without an answer: {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body, sent)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_huge_post_without_the_key_is_a_401_before_its_body_is_sent(
    server: LiveServer, chunked: bool
) -> None:
    started = time.monotonic()
    with HealthProbe(server.url) as rss:
        answer = post_raw(server, "/v1/chat/completions", HUGE, chunked=chunked)
    # the answer came on the head alone: the client never got to send the body
    assert answer.sent == 0, (
        f"the client sent {answer.sent} bytes before its {answer.status}; "
        f"the daemon grew {rss.rss_growth / MiB:.0f} MiB"
    )
    assert rss.rss_growth < MAX_GROWTH, f"the daemon grew {rss.rss_growth / MiB:.0f} MiB"
    assert answer.status == 401, answer.body
    assert answer.error()["code"] == "invalid_api_key"
    assert answer.headers.get("connection") == "close"  # the rest of the body is not wanted
    assert time.monotonic() - started < 10


def test_a_huge_post_with_a_wrong_key_is_refused_the_same_way(server: LiveServer) -> None:
    answer = post_raw(
        server, "/v1/embeddings", HUGE, headers={"Authorization": "Bearer not-the-key"}
    )
    assert (answer.status, answer.sent) == (401, 0), answer.body


def test_a_chat_body_over_its_bound_is_a_413_before_it_is_read(server: LiveServer) -> None:
    bound = ServerSettings().max_body_bytes
    assert bound == 16 * MiB  # the default the README promises
    with HealthProbe(server.url) as rss:
        answer = post_raw(
            server,
            "/v1/chat/completions",
            bound + 1,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert answer.status == 413, answer.body
    error = answer.error()
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(bound) in error["message"] and "max_body_bytes" in error["message"]
    assert answer.headers.get("connection") == "close"
    assert answer.sent == 0, f"the client sent {answer.sent} bytes before its 413"
    assert rss.rss_growth < MAX_GROWTH


def test_a_chunked_chat_body_is_a_413_when_it_passes_its_bound(server: LiveServer) -> None:
    bound = server.settings.max_body_bytes
    with HealthProbe(server.url) as rss:
        answer = post_raw(
            server,
            "/v1/chat/completions",
            4 * bound,
            headers={"Authorization": f"Bearer {KEY}"},
            chunked=True,
            wait=0.2,
        )
    assert answer.status == 413, answer.body
    assert answer.error()["code"] == "request_too_large"
    assert answer.headers.get("connection") == "close"
    # the daemon stopped reading at the bound; what the client got further is what the
    # sockets' buffers took while the answer was on its way
    assert bound < answer.sent < 2 * bound, f"{answer.sent / MiB:.1f} MiB sent"
    assert rss.rss_growth < MAX_GROWTH


def test_a_body_within_its_bound_is_served(server: LiveServer) -> None:
    """The body the guard read is the one the route parses."""
    answer = post_raw(
        server,
        "/v1/chat/completions",
        4 * MiB,
        headers={"Authorization": f"Bearer {KEY}"},
        chunked=True,
        wait=0,
    )
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["object"] == "chat.completion"


def _signed(server: LiveServer, path: str, body: bytes) -> dict[str, str]:
    authority = server.url.removeprefix("http://")
    return {
        CLUSTER_HEADER: request_header(CLUSTER_KEY, "POST", path, authority=authority, body=body)
    }


def test_a_peers_body_is_held_to_the_peer_bound(server: LiveServer) -> None:
    path = "/v1/pcrt/subgraphs"
    bound = server.settings.peer_max_body_bytes
    # a Content-Length over the bound: refused before the body, signed or not
    answer = post_raw(server, path, bound + 1, headers=_signed(server, path, b""))
    assert (answer.status, answer.sent) == (413, 0), answer.body
    assert "peer_max_body_bytes" in answer.error()["message"]
    # a chunked one: read (and hashed) up to the bound, then refused
    answer = post_raw(
        server, path, 4 * bound, headers=_signed(server, path, b""), chunked=True, wait=0.2
    )
    assert answer.status == 413, answer.body
    # within the bound, a signature over another body is refused before anything parses it
    answer = post_raw(server, path, bound // 2, headers=_signed(server, path, b"{}"), wait=0)
    assert answer.status == 401 and "cluster signature refused" in answer.error()["message"]


@pytest.mark.parametrize("why", ["forged", "stale", "elsewhere", "replayed"])
def test_a_signature_refused_whatever_the_body_costs_no_body(server: LiveServer, why: str) -> None:
    """A signature forged without the cluster key (its MAC without the body does not
    verify), or a captured one sent again, late or to another node, is a 401 before its
    (up to 64 MiB) body is read and hashed."""
    path = "/v1/pcrt/subgraphs"
    authority = server.url.removeprefix("http://")
    size = server.settings.peer_max_body_bytes // 2
    if why == "forged":
        header = request_header("not the key", "POST", path, authority=authority)
    elif why == "stale":
        stamp = time.time() - 10 * MAX_SKEW
        header = request_header(CLUSTER_KEY, "POST", path, authority=authority, now=stamp)
    elif why == "elsewhere":
        header = request_header(CLUSTER_KEY, "POST", path, authority="10.9.8.7:11434")
    else:
        header = request_header(CLUSTER_KEY, "POST", path, authority=authority)
        first = post_raw(server, path, 0, headers={CLUSTER_HEADER: header}, wait=0)
        assert first.status == 400, first.body  # signed, so let in (and its nonce spent)
    answer = post_raw(server, path, size, headers={CLUSTER_HEADER: header})
    assert answer.status == 401 and "cluster signature refused" in answer.error()["message"]
    assert answer.sent == 0, answer.sent


def test_a_peers_body_is_parsed_in_a_thread_to_fastapis_400(live_server: ServerFactory) -> None:
    """A signed body may be up to 64 MiB of JSON: the peer routes parse it in a worker
    thread, not on the loop, and a bad shape is the 400 FastAPI's parsing gave. (Parsing
    holds the GIL, so a thread halves the pause rather than removing it: 42 MB of a
    million small objects paused /health 0.35 s here, against 0.79 s on the loop.)"""
    settings = ServerSettings(api_key=KEY, peers=PeerSettings(cluster_key=CLUSTER_KEY))
    server = live_server(settings, opener=FakeEngines())
    path = "/v1/pcrt/runs"
    nodes = [{"node_id": f"n{i}", "status": "pending"} for i in range(100_000)]
    body = json.dumps({"run": {"id": "r"}, "nodes": nodes}).encode()
    authority = server.url.removeprefix("http://")
    signed = request_header(CLUSTER_KEY, "POST", path, authority=authority, body=body)
    headers = {CLUSTER_HEADER: signed, "Content-Type": "application/json"}
    with HealthProbe(server.url) as probe:
        reply = httpx.post(server.url + path, content=body, headers=headers, timeout=120)
    print(probe.report("peer body"))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "run.spec" and "Field required" in error["message"], error
    assert probe.failures == []
    signed = request_header(CLUSTER_KEY, "POST", path, authority=authority, body=b"{")
    reply = httpx.post(server.url + path, content=b"{", headers={CLUSTER_HEADER: signed})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"] == "the request body is not valid JSON"
