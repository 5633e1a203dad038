"""A prompt that cannot fit is refused before it is tokenized, and a request's checks run
off the event loop (issue 16, item 4).

The vocabulary's lower bound on a text's tokens (``engine.bounds``) must never say more
than the tokenizer makes: checked on the real vocabulary with the texts that come closest
(its longest piece over and over, SPM's ``▁``, special tokens, other scripts). A 30 MB
prompt over HTTP is a 400 ``context_length_exceeded`` naming its field while ``/health``
keeps answering and the memory stays put; a request whose checks take seconds (a slow
grammar, on a fake engine) does not hold up ``/health`` either.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.stall import many_rules_grammar
from pcrt.runtime.engine import Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.bounds import NO_BOUND, TokenBound
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.errors import ContextLengthExceeded
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngine, FakeEngines, Script
from tests.health_probe import HealthProbe
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2 Q4_1
HUGE = 30 * 2**20  # the probe's 30 MB prompt
# over HTTP: under the daemon's 16 MB bound on a completion body (issue 16, item 3), which
# refuses a 30 MB one with a 413 before it is read; past it, the 400 must come as cheaply
OVER_HTTP = 12 * 2**20


# -- the bound itself: pure ---------------------------------------------------------------


def test_the_bound_counts_characters_over_the_longest_piece() -> None:
    bound = TokenBound(longest_piece=4)
    assert [bound.fewest_tokens(t) for t in ("", "a", "abcd", "abcde", "é" * 8)] == [0, 1, 1, 2, 2]


def test_whitespace_does_not_count_where_a_special_token_strips_it() -> None:
    text = "<x>" + " \t\n\v\f\r" * 100 + "<x>"
    assert TokenBound(longest_piece=3, strips_whitespace=True).fewest_tokens(text) == 2
    assert TokenBound(longest_piece=3).fewest_tokens(text) == 202


def test_tokenizers_that_drop_characters_get_no_bound() -> None:
    assert NO_BOUND.fewest_tokens("x" * 10_000) == 0


# -- the bound against the real vocabulary ------------------------------------------------


@pytest.fixture(scope="module")
def engine(default_model_path: Path) -> Iterator[Engine]:
    config = EngineConfig(parallel=1, context=512, n_threads=2)
    with Engine(default_model_path, model_sha256=SHA256, config=config, name=MODEL) as eng:
        yield eng


def test_the_bound_never_exceeds_the_tokens_made(engine: Engine) -> None:
    model = engine.model
    bound = model.token_bound
    assert bound.longest_piece > 1  # SmolLM2's BPE: bounded
    longest = max(range(model.n_vocab), key=lambda t: len(model.token_text(t).encode()))
    texts = [
        model.token_text(longest) * 50,  # the piece the bound divides by, over and over
        "\u2581" * 300,  # SPM's space stand-in: three bytes that may become a one-byte piece
        "<|im_start|><|im_end|>" * 40,  # special tokens, parsed as one token each
        " " * 5000,
        "\n" * 5000,
        "Ünïcödé ✓ 漢字 🙂 " * 100,
        "The quick brown fox jumps over the lazy dog. " * 50,
    ]
    for text in texts:
        for parse_special in (True, False):
            made = model.tokenize(text, add_special=False, parse_special=parse_special)
            assert bound.fewest_tokens(text) <= len(made), text[:40]


def test_a_huge_prompt_is_refused_before_it_is_tokenized(engine: Engine) -> None:
    started = time.perf_counter()
    with pytest.raises(ContextLengthExceeded, match="at least"):
        engine.prepare(GenerateRequest(prompt="word " * (HUGE // 5)))
    with pytest.raises(ContextLengthExceeded, match="at least"):
        engine.prepare(
            GenerateRequest(messages=[ChatMessage(role="user", content="word " * (HUGE // 5))])
        )
    # tokenizing it took 7.8 s here; the bound needs no tokenizer
    assert time.perf_counter() - started < 3


def test_a_prompt_just_over_the_bound_is_refused_with_its_count(engine: Engine) -> None:
    """Under the bound but over the context: tokenized with a ceiling, refused exactly."""
    prompt = "word " * 600  # some 600 tokens in 3,000 characters: under the bound's say
    assert engine.model.token_bound.fewest_tokens(prompt) < engine.context_per_slot
    count = len(engine.model.tokenize(prompt))
    with pytest.raises(ContextLengthExceeded, match=f"has {count} tokens"):
        engine.prepare(GenerateRequest(prompt=prompt))


async def test_checks_can_be_awaited_in_a_thread(engine: Engine) -> None:
    request = GenerateRequest(prompt="Hello there", sampling=SamplingParams(max_tokens=2))
    assert await engine.prepare_in_thread(request) == engine.prepare(request)
    assert await engine.tokenize_request_in_thread(request) == engine.tokenize_request(request)
    with pytest.raises(ContextLengthExceeded):
        await engine.prepare_in_thread(GenerateRequest(prompt="word " * (HUGE // 5)))


# -- over HTTP: the loop keeps answering ----------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=2, api_key=KEY)
    return module_live_server(settings)


@pytest.mark.parametrize(
    ("route", "field"), [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")]
)
def test_a_12_mb_prompt_is_a_400_while_health_answers(
    server: LiveServer, route: str, field: str
) -> None:
    text = "word " * (OVER_HTTP // 5)
    if field == "prompt":
        payload = {"model": MODEL, "prompt": text, "max_tokens": 1}
    else:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    body = json.dumps(payload).encode()
    del text, payload
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        client.post(route, json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})  # loaded
        with HealthProbe(server.url) as poll:
            response = client.post(route, content=body)
    print(poll.report(route))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", field)
    assert "at least" in error["message"]
    assert poll.failures == [] and poll.worst < 1.0, poll.report(route)
    assert poll.rss_growth < 100 * 2**20, poll.report(route)


@pytest.mark.parametrize(
    ("grammar", "says"),
    [
        # refused for its size before anything reads it
        (many_rules_grammar(rules=6000, width=2000), "12111795 characters; at most 262144"),
        # within every bound: converted from GBNF (0.4 s of Python) and compiled until
        # llguidance refuses it (1.6 s), in the request's checks, off the loop
        (many_rules_grammar(rules=998, width=240) + 'r998 ::= "a"\n', "too big"),
    ],
)
def test_a_huge_grammar_is_checked_while_health_answers(
    server: LiveServer, grammar: str, says: str
) -> None:
    payload = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "grammar": grammar}
    body = json.dumps(payload).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=120) as client,
        HealthProbe(server.url) as poll,
    ):
        response = client.post("/v1/completions", content=body)
    print(poll.report("grammar"))
    assert response.status_code == 400 and says in response.text, response.text
    assert poll.failures == [] and poll.worst < 0.5, poll.report("grammar")


# -- a slow check stays off the loop (a fake engine whose checks take 2 s) ---------------


@pytest.fixture
def slow_checks(live_server: ServerFactory) -> LiveServer:
    return live_server(ServerSettings(parallel=2), opener=FakeEngines(prepare_seconds=2.0))


@pytest.mark.parametrize("stream", [False, True])
def test_a_slow_check_does_not_hold_up_health(slow_checks: LiveServer, stream: bool) -> None:
    payload = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": stream}
    with HealthProbe(slow_checks.url) as poll:
        started = time.perf_counter()
        response = httpx.post(slow_checks.url + "/v1/completions", json=payload, timeout=30)
        took = time.perf_counter() - started
    print(poll.report("slow check"))
    assert response.status_code == 200, response.text
    assert took >= 2.0  # the checks did run, in a worker thread
    assert poll.failures == [] and poll.worst < 1.0, poll.report("slow check")


async def test_a_slow_check_in_the_engine_lets_the_loop_run() -> None:
    """What the DAG executor awaits: the fake's checks take 0.5 s, the loop ticks on."""
    eng = FakeEngine(script=Script(prepare_seconds=0.5))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    try:
        await eng.prepare_in_thread(GenerateRequest(prompt="Hi"))
    finally:
        ticker.cancel()
    assert ticks >= 20
