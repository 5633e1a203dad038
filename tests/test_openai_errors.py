"""The daemon's refusals over the OpenAI API, in OpenAI's error shape (``message``,
``type``, ``param``, ``code``), as the official SDK raises them: an unknown model (404),
a prompt over the context naming its field (400), invalid fields (400), a wrong key (401),
and an overloaded model (503 with Retry-After).

On a fake engine (``tests/fakes.py``): the errors are the daemon's, whatever model
answers. Its tokens come 10 ms apart, so that six requests at once overlap.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, queue_size=1, api_key=KEY)
    return module_live_server(settings, opener=FakeEngines(token_seconds=0.01))


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert _error(info.value)["code"] == "model_not_found"


def test_context_length_is_400_naming_the_field(client: openai.OpenAI) -> None:
    """Each endpoint's error names its own text field as the OpenAI ``param``."""
    too_long = "word " * 3000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": too_long}]
        )
    assert _error(info.value)["code"] == "context_length_exceeded"
    assert _error(info.value)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=too_long)
    assert (_error(info.value)["code"], _error(info.value)["param"]) == (
        "context_length_exceeded",
        "prompt",
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=["short", too_long])
    assert (_error(info.value)["code"], _error(info.value)["param"]) == (
        "context_length_exceeded",
        "input",
    )


def test_invalid_fields_are_400(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert _error(info.value)["param"] == "temperature"
    with server.http() as h:
        bad = h.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "the request body is not valid JSON"
        missing = h.post("/v1/chat/completions", json={"model": MODEL})
        assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
        tools = h.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        )
        # a tool that is not one (no type, no function) names where it is wrong
        assert tools.status_code == 400 and tools.json()["error"]["param"].startswith("tools.0")
        route = h.get("/v1/nothing-here")
        assert route.status_code == 404 and "error" in route.json()


def test_bad_key_is_401(server: LiveServer) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert _error(info.value)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


async def test_queue_full_is_503(server: LiveServer) -> None:
    """2 slots + a queue of 1: of 6 long requests at once, the last 3 are refused."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 60,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as h:

        async def one() -> tuple[int, str | None]:
            async with h.stream("POST", "/v1/chat/completions", json=body) as r:
                await r.aread()
                return r.status_code, r.headers.get("retry-after")

        results = await asyncio.gather(*(one() for _ in range(6)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 200, 503, 503, 503], results
    assert all(ra is not None for s, ra in results if s == 503)


async def test_queue_full_is_an_openai_error_through_the_sdk(server: LiveServer) -> None:
    """2 slots + a queue of 1: of 6 long requests at once, 3 are refused with a 503 the
    SDK raises as InternalServerError, in OpenAI's error shape."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one() -> openai.APIStatusError | str:
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Write a long story."}],
                max_tokens=60,
                stream=True,
                logit_bias=NO_EOS,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        except openai.APIStatusError as exc:
            return exc

    async with client:
        results = await asyncio.gather(*(one() for _ in range(6)))
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(refused) == 3, results
    for exc in refused:
        assert isinstance(exc, openai.InternalServerError) and exc.status_code == 503
        error = exc.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_overloaded" and error["code"] == "overloaded"
        assert int(exc.response.headers["retry-after"]) >= 1
    assert all(isinstance(r, str) and r for r in results if r not in refused)
