"""Where an answer ends over the OpenAI API, on the real default model:
``max_completion_tokens`` caps it, ``stop`` cuts it, the text-completion stream carries it
to ``[DONE]`` in OpenAI's chunk shape, and a non-streamed client that leaves stops it and
frees its slot. And the decode speed the node reports to peers, measured from such
answers."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import openai
import pytest

from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

MODEL = "smollm2-135m"
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens
# one thread: two llama.cpp threads spin at barriers, and with another model process on
# the 2 shared cores a decode step slowed from ms to seconds (measured); one never waits
THREADS = 1


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=THREADS, queue_size=1)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def busy(server: LiveServer) -> int:
    with server.http() as h:
        return sum(m["busy_slots"] for m in h.get("/v1/pcrt/ps").json()["models"])


def test_max_completion_tokens_caps_the_output(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story."}],
        max_completion_tokens=3,
        logit_bias=NO_EOS,  # only the cap can end it
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    # it takes the place of max_tokens when both are given, as OpenAI's does
    both = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=40,
        max_completion_tokens=4,
        logit_bias=NO_EOS,
    )
    assert both.usage is not None and both.usage.completion_tokens == 4


def test_stop_cuts_the_text(client: openai.OpenAI) -> None:
    prompt = "Count: 1, 2, 3,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert " 6," in text
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[" 6,", "never"]
    )
    assert cut.choices[0].text == text[: text.index(" 6,")]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_text_completion_has_openai_chunk_shape(
    client: openai.OpenAI, server: LiveServer
) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(**body)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with server.http() as h, h.stream("POST", "/v1/completions", json=stream) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    *texts, usage = chunks
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == MODEL
        assert isinstance(c["created"], int)
    for c in texts:
        assert c["usage"] is None  # include_usage: null on every chunk but the last
        (choice,) = c["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
        assert choice["index"] == 0
    finishes = [c["choices"][0]["finish_reason"] for c in texts]
    assert finishes[-1] == plain.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert "".join(c["choices"][0]["text"] for c in texts) == plain.choices[0].text
    assert usage["choices"] == []
    assert plain.usage is not None
    assert usage["usage"]["completion_tokens"] == plain.usage.completion_tokens
    assert usage["usage"]["prompt_tokens"] == plain.usage.prompt_tokens
    # the SDK reads the same stream
    sdk = list(client.completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in sdk if c.choices) == plain.choices[0].text


def test_a_non_streamed_client_that_leaves_frees_its_slot(server: LiveServer) -> None:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a very long essay."}],
            "max_tokens": 900,
            "logit_bias": NO_EOS,
        }
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nX-PC-Agent-ID: leaver\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while busy(server) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert busy(server) == 1  # generating, and the client waits for the whole answer
        time.sleep(0.3)
    # the connection is closed: the daemon notices, stops the generation, frees the slot
    left = time.monotonic()
    while busy(server) and time.monotonic() - left < 5:
        time.sleep(0.05)
    assert busy(server) == 0
    engine = server.services.pool.loaded()[0].engine
    # the slot keeps what it decoded: far fewer than the 900 tokens asked for
    assert max(s.n_tokens for s in engine.slots()) < 450
    rows = server.usage_rows("leaver")
    assert [r["status"] for r in rows] == [499]
    # what it generated before it left is accounted (and charged to its token budget)
    assert 0 < (rows[0]["completion_tokens"] or 0) < 900
    with server.http() as h:
        after = h.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert after.status_code == 200


def test_node_info_reports_the_speed_its_answers_measured(server: LiveServer) -> None:
    """Never benched (no ``pcrt bench`` result), the node still tells peers and the
    policy a measured tokens/s: the median of its recent answers with the model."""
    node = server.services.node
    node.facts_ttl = 0.0  # read afresh
    with server.http() as h:
        for _ in range(3):
            answer = h.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Count to fifty."}],
                    "max_tokens": 40,
                    "logit_bias": NO_EOS,
                    "temperature": 0,
                },
            )
            assert answer.status_code == 200
    offer = next(o for o in node.offers() if o.name == MODEL)
    rows = [r for r in server.services.usage.rows() if r["model"] == MODEL and r["status"] == 200]
    decode = [
        (r["completion_tokens"] - 1) / ((r["total_ms"] - r["ttft_ms"]) / 1000)
        for r in rows[-20:]
        if r["completion_tokens"] >= 16
    ]
    assert offer.tokens_per_s is not None and 10 < offer.tokens_per_s < 2000
    assert min(decode) <= offer.tokens_per_s <= max(decode)
