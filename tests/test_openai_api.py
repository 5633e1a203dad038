"""The daemon over real HTTP on loopback, driven by the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.settings import AgentLimits, LimitSettings, ServerSettings
from tests.conftest import shared_models_dir
from tests.live_server import LiveServer

KEY = "test-key"
MODEL = "smollm2-135m"
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens


@pytest.fixture(scope="module")
def server(
    default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("server-home")
    paths = Paths(home=home, models_dir=shared_models_dir(), user_models_file=home / "none.toml")
    settings = ServerSettings(
        parallel=2,
        context=1024,
        n_threads=2,
        queue_size=1,
        api_key=KEY,
        limits=LimitSettings(
            agents={
                "limited": AgentLimits(requests_per_minute=2),
                "dag-limited": AgentLimits(requests_per_minute=1),
            },
        ),
    )
    with LiveServer(settings, registry=Registry.load(paths)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def http(server: LiveServer) -> httpx.Client:
    # httpx's default 5 s timeout flaked under load (a ReadTimeout mid-stream)
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


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
    with http(server) as h:
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
        assert tools.status_code == 400 and "not supported" in tools.json()["error"]["message"]
        route = h.get("/v1/nothing-here")
        assert route.status_code == 404 and "error" in route.json()


def test_bad_key_is_401(server: LiveServer) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert _error(info.value)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_rate_limit_is_429_and_recovers(client: openai.OpenAI, server: LiveServer) -> None:
    limiter = server.services.limiter
    clock = [0.0]
    limiter.clock = lambda: clock[0]  # a controllable clock: no sleeping in tests
    limiter._requests.clear()
    headers = {"X-PC-Agent-ID": "limited"}
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, extra_headers=headers
        )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, extra_headers=headers
        )
    assert _error(info.value)["code"] == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1
    clock[0] += 31  # half a minute refills one request of a 2-per-minute bucket
    client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_headers=headers
    )


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


def _busy(server: LiveServer) -> int:
    with http(server) as h:
        return sum(m["busy_slots"] for m in h.get("/api/ps").json()["models"])


def test_disconnect_mid_stream_frees_the_slot(server: LiveServer, client: openai.OpenAI) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        "max_tokens": 900,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    with http(server) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
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


def test_usage_rows_match_responses(client: openai.OpenAI, server: LiveServer) -> None:
    headers = {"X-PC-Agent-ID": "auditor"}
    replies = [
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Say the number {i}."}],
            max_tokens=8,
            extra_headers=headers,
        )
        for i in range(3)
    ]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], extra_headers=headers
        )
    with Store(server.services.pool.registry.paths.db_path) as store:
        rows = UsageLog(store).rows(agent="auditor")
    assert [r["status"] for r in rows] == [200, 200, 200, 404]
    for row, reply in zip(rows, replies, strict=False):
        assert reply.usage is not None
        assert row["prompt_tokens"] == reply.usage.prompt_tokens
        assert row["completion_tokens"] == reply.usage.completion_tokens
        assert row["cached_tokens"] == reply.usage.prompt_tokens_details.cached_tokens
        assert row["model"] == MODEL and row["ran_on"] == "local"
        assert row["ttft_ms"] is not None and row["total_ms"] >= row["ttft_ms"]


def test_metrics_parse_and_move(client: openai.OpenAI, server: LiveServer) -> None:
    def scrape() -> dict[str, float]:
        with http(server) as h:
            text = h.get("/metrics").text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("model", MODEL) == MODEL:
                    key = sample.name + (
                        f"[{sample.labels['status']}]" if "status" in sample.labels else ""
                    )
                    values[key] = values.get(key, 0.0) + sample.value
        return values

    before = scrape()
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    after = scrape()
    assert after["pcrt_requests_total[200]"] == before.get("pcrt_requests_total[200]", 0) + 1
    assert after["pcrt_completion_tokens_total"] > before.get("pcrt_completion_tokens_total", 0)
    assert after["pcrt_time_to_first_token_seconds_count"] == (
        before.get("pcrt_time_to_first_token_seconds_count", 0) + 1
    )
    assert after["pcrt_loaded_models"] == 1
    assert "pcrt_busy_slots" in after and "pcrt_queue_depth" in after


def test_ps_and_stop(server: LiveServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    with http(server) as h:
        models = h.get("/api/ps").json()["models"]
        assert models[0]["name"] == MODEL and models[0]["parallel"] == 2
        assert models[0]["expires_at"] > time.time()
        assert h.post("/api/stop", json={"model": MODEL}).json()["unloaded"] is True
        assert h.get("/api/ps").json()["models"] == []
        assert h.post("/api/stop", json={"model": "nope"}).status_code == 404
    # the next request loads it again
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )


def test_device_profile_for_peers(server: LiveServer) -> None:
    with http(server) as h:
        profile = h.get("/v1/pcrt/device").json()
    assert profile["fingerprint"] and profile["cpu_only"] is True  # no GPU on this machine
    assert profile["cpu_only_reason"]
    assert server.services.monitor.running  # live fields keep refreshing while serving


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


def test_a_dag_run_counts_as_one_of_its_agents_requests(server: LiveServer) -> None:
    """Starting a run is admitted like a request: over the agent's rate it is a 429 with
    Retry-After, and no run is recorded."""
    dag = {"dag": "/dynamic/limited", "nodes": {"ok": {"type": "assert", "that": "1 < 2"}}}
    headers = {"X-PC-Agent-ID": "dag-limited"}
    with http(server) as h:
        first = h.post("/v1/dags", json={"dag": dag}, headers=headers)
        assert first.status_code == 200 and first.json()["status"] == "succeeded"
        before = h.get("/v1/dags").json()["data"]
        second = h.post("/v1/dags", json={"dag": dag}, headers=headers)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        assert float(second.headers["retry-after"]) > 0
        assert h.get("/v1/dags").json()["data"] == before
        # another agent is not held back
        other = h.post("/v1/dags", json={"dag": dag}, headers={"X-PC-Agent-ID": "free"})
        assert other.status_code == 200
        # resuming a run is a request of the agent it bills, whoever asks
        run_id = first.json()["id"]
        server.services.dags.runner.runs.set_status(run_id, "interrupted")
        resumed = h.post(f"/v1/dags/{run_id}/resume", headers={"X-PC-Agent-ID": "free"})
        assert resumed.status_code == 429, resumed.text
        assert h.get(f"/v1/dags/{run_id}").json()["status"] == "interrupted"


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
    with http(server) as h:
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
