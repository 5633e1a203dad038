"""Token log probabilities over HTTP on the real default model, read by the official
OpenAI SDK: chat's ``logprobs``/``top_logprobs`` and the legacy completions' ``logprobs``,
streamed and not, in OpenAI's shapes, with values that are the model's distribution."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openai
import pytest

from pcrt.runtime.engine.sampling import token_logprob
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end tokens: every run is 12 tokens
MESSAGES = [{"role": "user", "content": "Write a sentence about the sea."}]


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=2, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def test_chat_logprobs_are_the_models_distribution(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=12,
        logit_bias=NO_EOS,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == 12 == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert bytes(entry.bytes or []).decode() == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(lp <= 0 for lp in tops) and sum(math.exp(lp) for lp in tops) <= 1.0001
        # greedy, nothing but the end banned: the pick is the likeliest token
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_streamed_chat_logprobs_match_the_whole_answer(client: openai.OpenAI) -> None:
    args = {
        "model": MODEL,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 12,
        "logit_bias": NO_EOS,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**args)
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    expected = whole.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in expected
    ]


def test_legacy_completion_logprobs(client: openai.OpenAI) -> None:
    args = {
        "model": MODEL,
        "prompt": "The sea is",
        "temperature": 0,
        "max_tokens": 8,
        "logit_bias": NO_EOS,
        "logprobs": 2,
    }
    reply = client.completions.create(**args)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset[0] == 0
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])
    assert len(logprobs.token_logprobs or []) == 8
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in client.completions.create(stream=True, **args):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens.extend(choice.logprobs.tokens or [])
                offsets.extend(choice.logprobs.text_offset or [])
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


def test_logprobs_of_a_constrained_answer_and_of_a_fork(client: openai.OpenAI) -> None:
    """A schema's answer reports the model's own logprobs (its pick may be a token the
    model ranked lower: the grammar chose); each branch of a fork has its own."""
    schema = {"type": "object", "properties": {"sea": {"type": "string", "maxLength": 20}}}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0.8,
        seed=3,
        n=2,
        max_tokens=30,
        logprobs=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert entries and "".join(e.token for e in entries) == choice.message.content
        assert all(e.top_logprobs == [] for e in entries)


def test_bad_logprobs_requests_are_400s(server: LiveServer) -> None:
    with server.http() as h:
        for extra, says in (
            ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ):
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}
            r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and says in r.text, r.text
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 6})
        assert r.status_code == 400 and "logprobs" in r.text, r.text


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_token_logprob_is_the_log_softmax_and_its_top_the_likeliest(scale: float) -> None:
    """The shortcut that looks near the peak first gives what sorting the whole row gives,
    for flat, ordinary and peaked distributions."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(49_152) * scale).astype(np.float32)
    result = token_logprob(logits, 11, 20, lambda t: str(t).encode())
    exact = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64))
    assert result.chosen.logprob == pytest.approx(exact[11], abs=1e-4)
    assert [c.token for c in result.top] == list(np.argsort(-exact, kind="stable")[:20])
    assert [c.piece for c in result.top[:1]] == [str(result.top[0].token).encode()]
