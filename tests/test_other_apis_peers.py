"""Ollama's, Anthropic's and the Responses API's requests for a model only a peer has:
each is translated into a chat completion, sent to the peer (here a pcrt daemon listed as
a static OpenAI-compatible peer, on the real model), and its answer comes back in the
client's own API, streamed or not, with the edge's usage row naming the surface's route
and the peer it ran on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import pytest

from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory
from tests.peering import unique_name, wait_for
from tests.test_peer_routing import _loaded
from tests.test_peers import _daemon, _in_rotation

ONLY_THERE = "smol-far"


@pytest.fixture(scope="module")
def edge(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    far = f'[models.{ONLY_THERE}]\nsource = "{default_model_path}"\ncontext = 1024\n'
    strong = module_live_server(ServerSettings(parallel=2, context=1024), models=far)
    peer = StaticPeer(name="strong", url=strong.url, kind="openai", models=(ONLY_THERE,))
    settings = ServerSettings(peers=PeerSettings(static=(peer,), health_interval=0.5))
    server = module_live_server(settings)
    wait_for(lambda: _in_rotation(server, "strong"), 10, "the static peer is up")
    return server


def test_ollama_chat_and_generate_run_on_the_peer(edge: LiveServer) -> None:
    agent = unique_name("ollama-far")
    client = ollama.Client(host=edge.url, headers={"X-PC-Agent-ID": agent})
    ask = [{"role": "user", "content": "Count from 1 to 20."}]
    options = {"temperature": 0, "num_predict": 8}
    whole = client.chat(model=f"{ONLY_THERE}:latest", messages=ask, options=options)
    parts = list(client.chat(model=ONLY_THERE, messages=ask, options=options, stream=True))
    assert whole.message.content == "".join(p.message.content or "" for p in parts)
    assert whole.eval_count == parts[-1].eval_count == 8 and parts[-1].done
    assert whole.eval_duration and whole.eval_duration > 0  # the peer's timings came back

    said = client.generate(model=ONLY_THERE, prompt="Say hi.", options=options)
    assert said.context and len(said.context) == (said.prompt_eval_count or 0) + 8
    wait_for(lambda: len(edge.usage_rows(agent)) == 3, 5, "the edge's usage rows")
    rows = edge.usage_rows(agent)
    assert [(r["route"], r["ran_on"], r["status"]) for r in rows] == [
        ("/api/chat", "strong", 200),
        ("/api/chat", "strong", 200),
        ("/api/generate", "strong", 200),
    ]
    assert [r["completion_tokens"] for r in rows] == [8, 8, 8]


def test_anthropic_and_responses_run_on_the_peer(edge: LiveServer) -> None:
    agent = unique_name("sdk-far")
    headers = {"X-PC-Agent-ID": agent}
    claude = anthropic.Anthropic(
        base_url=edge.url, api_key="unused", max_retries=0, default_headers=headers
    )
    message = claude.messages.create(
        model=ONLY_THERE,
        max_tokens=8,
        messages=[{"role": "user", "content": "Count from 1 to 20."}],
        extra_body={"temperature": 0},
    )
    assert message.content and message.usage.output_tokens == 8
    with claude.messages.stream(
        model=ONLY_THERE,
        max_tokens=8,
        messages=[{"role": "user", "content": "Count from 1 to 20."}],
        extra_body={"temperature": 0},
    ) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == message.content[0].text

    openai_client = edge.sdk().with_options(default_headers=headers)
    response = openai_client.responses.create(
        model=ONLY_THERE, input="Count from 1 to 20.", max_output_tokens=16, temperature=0
    )
    assert response.output_text and response.usage is not None
    assert response.usage.output_tokens == 16

    wait_for(lambda: len(edge.usage_rows(agent)) == 3, 5, "the edge's usage rows")
    rows = edge.usage_rows(agent)
    assert [(r["route"], r["ran_on"]) for r in rows] == [
        ("/v1/messages", "strong"),
        ("/v1/messages", "strong"),
        ("/v1/responses", "strong"),
    ]


def test_a_peer_that_does_not_answer_is_said_in_each_apis_shape(live_server: ServerFactory) -> None:
    """The only peer listing the model does not answer (out of rotation): each API's
    404 in its own shape, saying why for every node."""
    gone = StaticPeer(name="gone", url="http://127.0.0.1:9", kind="openai", models=("far",))
    edge = live_server(ServerSettings(peers=PeerSettings(static=(gone,), health_interval=0.5)))
    hi = [{"role": "user", "content": "hi"}]
    asks: dict[str, dict[str, Any]] = {
        "/api/chat": {"model": "far", "messages": hi},
        "/v1/messages": {"model": "far", "max_tokens": 8, "messages": hi},
        "/v1/responses": {"model": "far", "input": "hi"},
    }
    messages = []
    for path, body in asks.items():
        answer = httpx.post(edge.url + path, json=body, timeout=30)
        assert answer.status_code == 404, (path, answer.text)
        error = answer.json()
        if path == "/api/chat":
            messages.append(error["error"])
        elif path == "/v1/messages":
            assert error["type"] == "error" and error["error"]["type"] == "not_found_error"
            messages.append(error["error"]["message"])
        else:
            assert error["error"]["code"] == "no_route"
            messages.append(error["error"]["message"])
    for message in messages:
        assert message.startswith("nowhere to run") and "gone: " in message


def test_a_pcrt_peer_is_asked_in_the_clients_own_api(tmp_path: Path) -> None:
    """Between two pcrt daemons (LAN, fake engines: the routing is the subject), Ollama's
    and Anthropic's requests go to the peer as they came, not translated: the peer's
    usage row names the API's route, and both daemons count the same tokens, streamed or
    not."""
    key = uuid.uuid4().hex
    a_name, b_name = unique_name("a"), unique_name("b")
    ollama_body: dict[str, Any] = {
        "model": "smollm2-135m:latest",
        "messages": [{"role": "user", "content": "Say hi."}],
        "options": {"num_predict": 6},
    }
    anthropic_body: dict[str, Any] = {
        "model": "smollm2-135m",
        "max_tokens": 6,
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    asks = [
        ("/api/chat", {**ollama_body, "stream": False}, "ollama-whole"),
        ("/api/chat", ollama_body, "ollama-stream"),
        ("/v1/messages", anthropic_body, "anthropic-whole"),
        ("/v1/messages", {**anthropic_body, "stream": True}, "anthropic-stream"),
    ]
    with (
        _daemon(tmp_path, a_name, key, opener=FakeEngines()) as a,
        _daemon(tmp_path, b_name, key, opener=FakeEngines()) as b,
    ):
        wait_for(lambda: _in_rotation(a, b_name), 10, "a trusts b")
        for path, body, label in asks:
            agent = unique_name(label)
            headers = {"X-PC-Route": "peer", "X-PC-Agent-ID": agent}
            with httpx.stream(
                "POST", a.url + path, json=body, headers=headers, timeout=60
            ) as answer:
                assert answer.status_code == 200, label
                assert answer.headers["x-pc-ran-on"] == b_name
                text = answer.read().decode()
            if path == "/api/chat" and body.get("stream") is False:
                assert json.loads(text)["done"] is True
            elif path == "/api/chat":
                assert json.loads(text.splitlines()[-1])["done"] is True
            elif body.get("stream"):
                assert "event: message_stop" in text
            else:
                assert json.loads(text)["type"] == "message"
            wait_for(lambda: len(a.usage_rows(agent)) == 1, 5, "a's usage row")  # noqa: B023
            (on_a,) = a.usage_rows(agent)
            (on_b,) = b.usage_rows(agent)
            assert on_b["route"] == on_a["route"] == path, label  # asked natively
            assert on_b["ran_on"] == "local" and on_a["ran_on"] == b_name
            assert on_a["completion_tokens"] == on_b["completion_tokens"] > 0, label
            assert on_a["prompt_tokens"] == on_b["prompt_tokens"] > 0, label
        assert _loaded(a.url) == []
