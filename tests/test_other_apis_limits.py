"""The daemon's limits hold for Ollama's, Anthropic's and the Responses API as for
OpenAI's (one path): an agent over its requests per minute gets a 429 with Retry-After,
a full queue a 503 with Retry-After, each in its API's error shape and through its own
client, and /metrics counts the requests under each route. On fake engines: the limits
and their shapes are the subject, not the model."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from pcrt.runtime.server.settings import AgentLimits, LimitSettings, ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]
# one request each of the three APIs, streamed, long enough to hold a slot
LONG: dict[str, dict[str, Any]] = {
    "/api/chat": {"model": MODEL, "messages": HI, "options": {"num_predict": 60}},
    "/v1/messages": {"model": MODEL, "messages": HI, "max_tokens": 60, "stream": True},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 60, "stream": True},
}


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(
        parallel=2,
        context=1024,
        queue_size=1,
        limits=LimitSettings(agents={"one-a-minute": AgentLimits(requests_per_minute=1)}),
    )
    return module_live_server(settings, opener=FakeEngines(token_seconds=0.01))


def test_an_agent_over_its_rate_gets_a_429_in_each_apis_shape(server: LiveServer) -> None:
    headers = {"X-PC-Agent-ID": "one-a-minute"}
    chat = ollama.Client(host=server.url, headers=headers)
    chat.chat(model=MODEL, messages=HI, options={"num_predict": 2})
    with pytest.raises(ollama.ResponseError) as ollamas:
        chat.chat(model=MODEL, messages=HI, options={"num_predict": 2})
    assert ollamas.value.status_code == 429 and "requests per minute" in ollamas.value.error

    claude = anthropic.Anthropic(
        base_url=server.url, api_key="unused", max_retries=0, default_headers=headers
    )
    with pytest.raises(anthropic.RateLimitError) as anthropics:
        claude.messages.create(model=MODEL, max_tokens=2, messages=HI)
    assert anthropics.value.body["error"]["type"] == "rate_limit_error"
    assert int(anthropics.value.response.headers["retry-after"]) >= 1

    responses = server.sdk().with_options(default_headers=headers)
    with pytest.raises(openai.RateLimitError) as openais:
        responses.responses.create(model=MODEL, input="hi", max_output_tokens=16)
    assert openais.value.code == "rate_limit_exceeded"


async def test_a_full_queue_is_a_503_in_each_apis_shape(server: LiveServer) -> None:
    """2 slots + a queue of 1: of 6 long requests at once, 3 are refused, whichever API
    each came through."""
    asked = [path for path in LONG for _ in range(2)]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:

        async def one(path: str) -> tuple[str, int, str | None, Any]:
            async with http.stream("POST", path, json=LONG[path]) as answer:
                body = await answer.aread()
                refused = answer.status_code == 503
                return (
                    path,
                    answer.status_code,
                    answer.headers.get("retry-after"),
                    (answer.json() if refused else body),
                )

        results = await asyncio.gather(*(one(path) for path in asked))
    assert sorted(status for _, status, _, _ in results) == [200, 200, 200, 503, 503, 503]
    for path, status, retry_after, body in results:
        if status != 503:
            continue
        assert retry_after is not None
        if path == "/api/chat":
            assert isinstance(body["error"], str)
        elif path == "/v1/messages":
            assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        else:
            assert body["error"]["code"] == "overloaded"


def test_metrics_count_each_apis_requests(server: LiveServer) -> None:
    ollama.Client(host=server.url).generate(model=MODEL, prompt="hi", options={"num_predict": 2})
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("pcrt_requests_total") and 'route="/api/generate"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1
