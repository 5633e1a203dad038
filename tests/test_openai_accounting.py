"""What the daemon counts per request over the OpenAI API: usage rows, the agent a request
bills (``X-PC-Agent-ID``, else OpenAI's ``user``), rate limits (requests and tokens per
minute: a 429 with Retry-After, then admitted once the bucket refills), the Prometheus
metrics, and a DAG run counted as one of its agent's requests.

On a fake engine (``tests/fakes.py``): the counts are the daemon's, whatever model answers.
Time stands still (``ManualClock``) until a test moves it.
"""

from __future__ import annotations

import math

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcrt.runtime.server.settings import AgentLimits, LimitSettings, ServerSettings
from tests.fakes import FakeEngines, ManualClock
from tests.live_server import LiveServer, ServerFactory

MODEL = "smollm2-135m"
NO_EOS = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens
TOKENS_PER_MINUTE = 50


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory, clock: ManualClock) -> LiveServer:
    settings = ServerSettings(
        parallel=2,
        context=1024,
        queue_size=1,
        limits=LimitSettings(
            agents={
                "limited": AgentLimits(requests_per_minute=2),
                "dag-limited": AgentLimits(requests_per_minute=1),
                "tpm": AgentLimits(tokens_per_minute=TOKENS_PER_MINUTE),
            },
        ),
    )
    return module_live_server(settings, opener=FakeEngines(), clock=clock)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


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
    rows = server.usage_rows("auditor")
    assert [r["status"] for r in rows] == [200, 200, 200, 404]
    for row, reply in zip(rows, replies, strict=False):
        assert reply.usage is not None
        assert row["prompt_tokens"] == reply.usage.prompt_tokens
        assert row["completion_tokens"] == reply.usage.completion_tokens
        assert row["cached_tokens"] == reply.usage.prompt_tokens_details.cached_tokens
        assert row["model"] == MODEL and row["ran_on"] == "local"
        assert row["ttft_ms"] is not None and row["total_ms"] >= row["ttft_ms"]


def test_body_user_names_the_agent_unless_the_header_does(
    client: openai.OpenAI, server: LiveServer
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, user="body-user")
    client.completions.create(model=MODEL, prompt="hi", max_tokens=2, user="body-user")
    client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=2,
        user="overridden",
        extra_headers={"X-PC-Agent-ID": "header-agent"},
    )
    rows = server.usage_rows("body-user")
    assert [(r["route"], r["status"]) for r in rows] == [
        ("/v1/chat/completions", 200),
        ("/v1/completions", 200),
    ]
    assert [r["status"] for r in server.usage_rows("header-agent")] == [200]
    assert server.usage_rows("overridden") == []


def test_rate_limit_is_429_and_recovers(
    client: openai.OpenAI, server: LiveServer, clock: ManualClock
) -> None:
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
    clock.advance(31)  # half a minute refills one request of a 2-per-minute bucket
    client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_headers=headers
    )


def test_tokens_per_minute_limit_is_429_with_retry_after(
    client: openai.OpenAI, server: LiveServer, clock: ManualClock
) -> None:
    headers = {"X-PC-Agent-ID": "tpm"}
    prompt = "word " * 30  # about 30 prompt tokens of a 50-per-minute allowance
    first = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, logit_bias=NO_EOS, extra_headers=headers
    )
    assert first.usage is not None
    spent = first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.usage.prompt_tokens > TOKENS_PER_MINUTE - spent  # a second one cannot fit
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_headers=headers)
    error = info.value.response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert f"{TOKENS_PER_MINUTE} tokens per minute" in error["message"]
    # the wait until the bucket refills enough for the prompt, in whole seconds
    missing = first.usage.prompt_tokens - (TOKENS_PER_MINUTE - spent)
    expected = math.ceil(missing * 60 / TOKENS_PER_MINUTE)
    assert int(info.value.response.headers["retry-after"]) == expected
    clock.advance(expected)  # after that wait it is admitted
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_headers=headers)
    assert [r["status"] for r in server.usage_rows("tpm")] == [200, 429, 200]


def test_metrics_parse_and_move(client: openai.OpenAI, server: LiveServer) -> None:
    def scrape() -> dict[str, float]:
        with server.http() as h:
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


def test_a_dag_run_counts_as_one_of_its_agents_requests(server: LiveServer) -> None:
    """Starting a run is admitted like a request: over the agent's rate it is a 429 with
    Retry-After, and no run is recorded."""
    dag = {"dag": "/dynamic/limited", "nodes": {"ok": {"type": "assert", "that": "1 < 2"}}}
    headers = {"X-PC-Agent-ID": "dag-limited"}
    with server.http() as h:
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
