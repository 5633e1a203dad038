"""The OpenAI-compatible API on the real default model, over real HTTP on loopback,
driven by the official OpenAI SDK: chat and text completions, streams with usage, forks
(``n``), JSON output, embeddings and the model list, sampling input checked before a
stream starts, grammars too deep for llama.cpp, and a client that disconnects mid-stream.

What the daemon counts and refuses whatever the model (usage rows, rate limits, metrics,
error shapes) is in ``test_openai_accounting.py`` and ``test_openai_errors.py``, on a fake
engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import openai
import pytest

from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=2, queue_size=1, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=16,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 16
    assert reply.usage.prompt_tokens_details is not None


def test_streamed_chat_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to five."}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the same conversation again: its prompt came from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completions_and_n2(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6
    )
    assert reply.object == "text_completion"
    assert "Paris" in reply.choices[0].text
    forked = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=2,
        temperature=1.0,
        seed=11,
        max_tokens=12,
    )
    assert [c.index for c in forked.choices] == [0, 1]
    assert all(c.message.content for c in forked.choices)


def test_json_schema_response_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a film and its year as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": schema}},
        seed=5,
        max_tokens=200,
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    obj = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with a JSON object with one key, "name".'}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=400,  # room to close the object: a cut one ends with "length", unparsed
    )
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_embeddings_and_models(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=["a cat", "a dog"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 576
    assert result.usage.prompt_tokens > 0
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert MODEL in ids
    extra = listed.data[ids.index(MODEL)].model_extra or {}
    assert extra["pcrt"]["pulled"] is True and extra["pcrt"]["default"] is True


def _busy(server: LiveServer) -> int:
    with server.http() as h:
        return sum(m["busy_slots"] for m in h.get("/v1/pcrt/ps").json()["models"])


def test_disconnect_mid_stream_frees_the_slot(server: LiveServer, client: openai.OpenAI) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        "max_tokens": 900,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert _busy(server) == 1
    # the connection is closed: the generation stops and the slot is free at once
    deadline = time.monotonic() + 5
    while _busy(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _busy(server) == 0
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None


def test_penalties_and_early_validation(client: openai.OpenAI, server: LiveServer) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List some words."}],
        presence_penalty=0.5,
        frequency_penalty=0.5,
        max_tokens=8,
    )
    assert reply.choices[0].message.content is not None
    # bad sampling input is a 400 before the stream starts, not an error event inside it
    for extra in ({"logit_bias": {"999999": 5}}, {"grammar": "root ::= (("}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                stream=True,
                extra_body=extra if "grammar" in extra else None,
                **({} if "grammar" in extra else extra),
            )
    assert _busy(server) == 0


def test_grammars_that_would_crash_llama_cpp_are_refused(server: LiveServer) -> None:
    """llama.cpp recurses per nested group and per chained rule: deep enough, it dies of
    a stack overflow and takes the daemon with it. Such grammars are a 400 (the same
    grammar at 20,000 levels killed the process before), and the daemon answers on."""
    deep = 20_000
    nested = "root ::= " + "(" * deep + '"a"' + ")" * deep
    # token literals may hold ")" (<)>): they must not hide the groups after them
    hidden = "root ::= " + "<)>" * 3000 + "(" * 2500 + '"a"' + ")" * 2500
    chained = (
        "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(6000)) + 'r6000 ::= "a"\n'
    )
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    with server.http() as h:
        for grammar, why in (
            (nested, "nests groups 20000 deep"),
            (hidden, "nests groups 2500 deep"),
            (chained, "6002 rules"),
        ):
            r = h.post("/v1/chat/completions", json={**body, "grammar": grammar})
            assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        raw = json.dumps({**body, "logit_bias": {"5": "BIAS"}}).replace('"BIAS"', "NaN")
        nan = h.post(
            "/v1/chat/completions",
            content=raw.encode(),
            headers={"content-type": "application/json"},
        )
        assert nan.status_code == 400 and "NaN" in nan.json()["error"]["message"], nan.text
        ok = h.post("/v1/chat/completions", json={**body, "grammar": 'root ::= (("a" | "b"))+'})
        assert ok.status_code == 200
        assert set(ok.json()["choices"][0]["message"]["content"]) <= {"a", "b"}
