"""Ollama's native API on the real default model, driven by Ollama's own Python library
and LangChain's ``ChatOllama``, unchanged but for the address (and the daemon's key as a
header): the model routes, chat and generate streamed and not, options, ``format``,
``keep_alive``, ``context``, embeddings, tool turns, pull progress from a local Hub, and
errors in Ollama's shape.

What the translation does without a model (messages, options, tool calls out of OpenAI's
chunks) is at the end of the file."""

from __future__ import annotations

import asyncio
import datetime
import json
import math
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.models.registry import HfSource, ModelEntry, Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.schemas.ollama import OllamaChatRequest
from pcrt.runtime.server.serving.chat_stream import ChatStream
from pcrt.runtime.server.serving.ollama import UNHONOURED_HEADER, _Lines, chat_request
from pcrt.runtime.server.serving.ollama_wire import model_name
from pcrt.runtime.server.settings import ServerSettings
from tests.httpserver import LocalServer, sha256_hex
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
GREEDY = {"temperature": 0, "num_predict": 12}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=2, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})


def _http(server: LiveServer) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )


# -- the model routes ----------------------------------------------------------------


def test_the_server_answers_as_ollama_does(server: LiveServer) -> None:
    with _http(server) as http:
        assert "Ollama is running" in http.get("/").text
        assert http.head("/").status_code == 200
        version = http.get("/api/version").json()["version"]
        assert tuple(int(p) for p in version.split(".")) >= (0, 6, 4)  # VS Code's minimum


def test_list_and_show_describe_the_gguf(client: ollama.Client) -> None:
    (listed,) = [m for m in client.list().models if m.model == f"{MODEL}:latest"]
    assert listed.size and listed.size > 50_000_000 and listed.digest
    assert listed.details is not None
    assert listed.details.family == "llama" and listed.details.quantization_level == "Q4_1"
    assert listed.details.parameter_size == "134.52M"

    for name in (MODEL, f"{MODEL}:latest"):
        shown = client.show(name)
        assert shown.capabilities == ["completion", "tools", "embedding"]
        assert shown.modelinfo is not None
        assert shown.modelinfo["general.architecture"] == "llama"
        assert shown.modelinfo["llama.context_length"] == 8192
        assert shown.modelinfo["general.parameter_count"] == 134_515_008
        assert shown.template and "<|im_start|>" in shown.template
        assert shown.parameters == "num_ctx 1024"


def test_ps_shows_a_loaded_model_with_its_expiry(client: ollama.Client) -> None:
    client.generate(model=MODEL, prompt="Hi", options=GREEDY, keep_alive="10m")
    (running,) = [m for m in client.ps().models if m.model == f"{MODEL}:latest"]
    assert running.context_length == 1024 and running.size_vram == 0
    assert running.size and running.size > 50_000_000
    assert running.details is not None and running.details.family == "llama"
    assert running.expires_at is not None
    left = running.expires_at - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=9) < left <= datetime.timedelta(minutes=10)


def test_keep_alive_loads_keeps_and_unloads(client: ollama.Client) -> None:
    loaded = client.generate(model=MODEL, prompt="", keep_alive=-1)
    assert loaded.done and loaded.done_reason == "load"
    (running,) = client.ps().models
    assert running.expires_at is not None and running.expires_at.year > 2300  # forever
    unloaded = client.chat(model=MODEL, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []
    # a request with keep_alive 0 unloads the model once it is answered
    client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options=GREEDY)
    assert len(client.ps().models) == 1
    client.chat(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], options=GREEDY, keep_alive=0
    )
    assert client.ps().models == []


# -- generations ------------------------------------------------------------------


def test_chat_streamed_and_not_agree_and_report_real_durations(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    whole = client.chat(model=MODEL, messages=messages, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert whole.message.role == "assistant" and whole.message.content
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    for final in (whole, parts[-1]):
        assert final.done_reason == "length" and final.eval_count == 12
        assert final.prompt_eval_count and final.prompt_eval_count > 10
        assert final.eval_duration and final.eval_duration > 1_000_000  # 12 tokens: > 1 ms
        assert final.prompt_eval_duration and final.prompt_eval_duration > 0
        assert final.total_duration and final.total_duration >= final.eval_duration
        assert final.load_duration is not None


def test_generate_with_system_raw_and_context(client: ollama.Client) -> None:
    first = client.generate(
        model=MODEL, prompt="What is the capital of France?", system="Answer in one word."
    )
    assert first.response and first.done_reason in ("stop", "length")
    assert first.context and all(isinstance(t, int) for t in first.context)
    # context: the prompt as the model read it (system and template) and the answer
    assert len(first.context) == (first.prompt_eval_count or 0) + (first.eval_count or 0)

    follow = client.generate(
        model=MODEL, prompt="And of Italy?", context=first.context, options=GREEDY
    )
    assert follow.context and follow.context[: len(first.context)] == first.context
    assert (follow.prompt_eval_count or 0) > len(first.context)

    raw = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True, options=GREEDY)
    assert raw.response.strip().startswith("5")
    templated = client.generate(model=MODEL, prompt="1, 2, 3, 4,", options=GREEDY)
    assert (templated.prompt_eval_count or 0) > (raw.prompt_eval_count or 0)


def test_options_map_onto_sampling(client: ollama.Client, server: LiveServer) -> None:
    ask = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    short = client.chat(model=MODEL, messages=ask, options={"num_predict": 3, "temperature": 0})
    assert short.eval_count == 3 and short.done_reason == "length"
    stopped = client.chat(
        model=MODEL, messages=ask, options={"temperature": 0, "num_predict": 60, "stop": ["5"]}
    )
    assert "5" not in (stopped.message.content or "") and stopped.done_reason == "stop"
    warm = {"temperature": 1.5, "top_k": 200, "top_p": 1.0, "num_predict": 16}
    runs = [
        client.chat(model=MODEL, messages=ask, options={**warm, "seed": seed}).message.content
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1] != runs[2]

    with _http(server) as http:
        asked = {
            "model": MODEL,
            "messages": ask,
            "stream": False,
            "options": {"num_predict": 2, "num_ctx": 8192, "mirostat": 2, "num_gpu": 1},
        }
        answer = http.post("/api/chat", json=asked)
    assert answer.status_code == 200
    said = answer.headers[UNHONOURED_HEADER]
    assert said.startswith("num_ctx") and "mirostat" in said and "num_gpu" in said


def test_format_json_and_schema_are_held(client: ollama.Client) -> None:
    ask = [{"role": "user", "content": "Describe a person."}]
    shaped = client.chat(
        model=MODEL, messages=ask, format=PERSON, options={"temperature": 0, "num_predict": 80}
    )
    jsonschema.validate(json.loads(shaped.message.content or ""), PERSON)
    anything = client.generate(
        model=MODEL,
        prompt="Give the name and age of a person.",
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    assert anything.done_reason == "stop", anything.response
    assert isinstance(json.loads(anything.response), dict)


def test_tool_calls_and_results_in_ollamas_shape(client: ollama.Client) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat(model=MODEL, messages=ask, options=GREEDY)
    offered = client.chat(model=MODEL, messages=ask, tools=TOOLS, options=GREEDY)
    assert (offered.prompt_eval_count or 0) > (plain.prompt_eval_count or 0) + 20

    # an earlier call (arguments as an object, no id) and its result (by tool name): the
    # small model follows its own example and calls again, held to the tool's schema
    history = [
        *ask,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny and 21 degrees."},
        {"role": "user", "content": "And in Rome?"},
    ]
    options = {"temperature": 0, "num_predict": 60}
    called = client.chat(model=MODEL, messages=history, tools=TOOLS, options=options)
    streamed = list(
        client.chat(model=MODEL, messages=history, tools=TOOLS, options=options, stream=True)
    )
    (calls,) = [p for p in streamed if p.message.tool_calls]
    for message in (called.message, calls.message):
        (call,) = message.tool_calls or []
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments, dict)
        jsonschema.validate(call.function.arguments, TOOLS[0]["function"]["parameters"])
    assert called.done_reason == streamed[-1].done_reason == "stop"
    assert not streamed[-1].message.tool_calls  # the calls leave once, before the last line

    # without tools offered, the same history is answered in text
    answered = client.chat(model=MODEL, messages=history, options=options)
    assert answered.message.content and not answered.message.tool_calls


def test_embed_and_the_legacy_route(client: ollama.Client) -> None:
    both = client.embed(model=MODEL, input=["a cat", "a dog"])
    assert len(both.embeddings) == 2 and len(both.embeddings[0]) == 576
    assert both.prompt_eval_count and both.prompt_eval_count >= 4
    legacy = client.embeddings(model=MODEL, prompt="a cat")
    assert legacy.embedding == pytest.approx(both.embeddings[0], abs=1e-5)
    short = client.embed(model=MODEL, input="a cat", dimensions=32).embeddings[0]
    assert len(short) == 32 and math.isclose(sum(v * v for v in short), 1.0, rel_tol=1e-6)


def test_embed_cuts_a_long_input_to_the_context_unless_told_not_to(
    client: ollama.Client, server: LiveServer
) -> None:
    """Ollama's /api/embed truncates by default (a RAG pipeline embeds long chunks and
    relies on it); ``truncate: false`` is a 400 for the same input."""
    client.embed(model=MODEL, input="load it")
    (loaded,) = server.services.pool.loaded()
    context = loaded.engine.context_per_slot
    head = " ".join(f"word{i}" for i in range(context * 2))  # far more than a context
    tails = [head + " and then the cat slept", head + " rivers, spaceships, other ends"]
    cut = client.embed(model=MODEL, input=tails)
    assert cut.prompt_eval_count == 2 * context  # each cut to exactly a context
    # what was cut was the tails: the two inputs embed the same
    assert cut.embeddings[0] == pytest.approx(cut.embeddings[1], abs=1e-6)
    short = client.embed(model=MODEL, input="word0 word1").embeddings[0]
    assert short != pytest.approx(cut.embeddings[0], abs=1e-3)
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=MODEL, input=tails[0], truncate=False)
    assert refused.value.status_code == 400 and f"at most {context}" in refused.value.error


def test_usage_rows_name_the_ollama_routes_and_the_agent(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "X-PC-Agent-ID": "ollama-agent"}
    agent = ollama.Client(host=server.url, headers=headers)
    said = agent.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options=GREEDY)
    agent.generate(model=MODEL, prompt="Hi", options=GREEDY)
    agent.embed(model=MODEL, input="Hi")
    rows = server.usage_rows("ollama-agent")
    assert [(r["route"], r["status"]) for r in rows] == [
        ("/api/chat", 200),
        ("/api/generate", 200),
        ("/api/embed", 200),
    ]
    assert rows[0]["completion_tokens"] == said.eval_count
    assert rows[0]["prompt_tokens"] == said.prompt_eval_count


def test_an_unload_waits_for_the_generation_under_way(client: ollama.Client) -> None:
    """keep_alive 0 from one client never cuts another's answer: the model goes after."""
    ask = [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]
    options = {"temperature": 0, "num_predict": 150}
    alone = client.chat(model=MODEL, messages=ask, options=options)
    long = client.chat(model=MODEL, messages=ask, options=options, stream=True)
    first = next(long)  # the generation is under way
    assert not first.done
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    rest = list(long)
    assert (first.message.content or "") + "".join(p.message.content or "" for p in rest) == (
        alone.message.content
    )
    assert rest[-1].done and rest[-1].eval_count == alone.eval_count
    assert client.ps().models == []  # gone once its last request ended


def test_odd_input_is_a_clear_400_or_said(client: ollama.Client, server: LiveServer) -> None:
    with _http(server) as http:
        # option names are the client's: any characters, named back in ASCII
        odd = {"model": MODEL, "prompt": "Hi", "stream": True, "options": {"温度": 1}}
        with http.stream("POST", "/api/generate", json=odd) as answer:
            assert answer.status_code == 200
            assert answer.headers[UNHONOURED_HEADER] == "\\u6e29\\u5ea6"
            lines = [json.loads(line) for line in answer.iter_lines() if line]
        assert lines[-1]["done"]
        for body, field in (
            ({"model": MODEL, "prompt": "Hi", "keep_alive": "9" * 400}, "keep_alive"),
            ({"model": MODEL, "prompt": "Hi", "context": [10**9]}, "context"),
            ({"model": MODEL, "prompt": "Hi", "options": {"stop": ["x"] * 100}}, "options.stop"),
            ({"model": MODEL, "prompt": "Hi", "format": {"type": "nope"}}, "format"),
        ):
            answer = http.post("/api/generate", json={**body, "stream": False})
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error.startswith(field) and "response_format" not in error, error
        assert http.post("/api/embeddings", json={"model": MODEL}).json() == {"embedding": []}
        said = http.post("/api/embed", json={"model": MODEL, "input": "a", "options": {"seed": 1}})
        assert said.status_code == 200 and said.headers[UNHONOURED_HEADER] == "seed"


def test_errors_leave_in_ollama_shape(client: ollama.Client, server: LiveServer) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert unknown.value.status_code == 404 and "no-such-model" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as thinking:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], think=True)
    assert thinking.value.status_code == 400 and "thinking" in thinking.value.error
    with _http(server) as http:
        for path, body in (
            ("/api/chat", b"{not json"),
            ("/api/chat", json.dumps({"model": MODEL, "keep_alive": "soon"}).encode()),
            ("/api/generate", json.dumps({"model": MODEL, "prompt": "x", "images": ["aGk="]})),
            ("/api/show", b"{}"),
            ("/api/embed", json.dumps({"model": MODEL, "input": []}).encode()),
        ):
            answer = http.post(path, content=body)
            assert answer.status_code == 400, (path, answer.text)
            error = answer.json()
            assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]
        assert http.request("DELETE", "/api/delete", json={"model": "nope"}).status_code == 404
        unauthorized = httpx.get(server.url + "/api/tags")
        assert unauthorized.status_code == 401 and list(unauthorized.json()) == ["error"]


def test_langchain_chat_ollama(server: LiveServer) -> None:
    from langchain_ollama import ChatOllama
    from pydantic import BaseModel, Field

    chat = ChatOllama(
        model=MODEL,
        base_url=server.url,
        temperature=0,
        num_predict=12,
        client_kwargs={"headers": {"Authorization": f"Bearer {KEY}"}},
    )
    reply = chat.invoke("Say hello.")
    assert reply.content and reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == 12
    streamed = "".join(str(piece.content) for piece in chat.stream("Say hello."))
    assert streamed == reply.content

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int

    structured = ChatOllama(
        model=MODEL,
        base_url=server.url,
        temperature=0,
        num_predict=80,
        client_kwargs={"headers": {"Authorization": f"Bearer {KEY}"}},
    ).with_structured_output(Person, method="json_schema")
    person = structured.invoke("Describe a person.")
    assert isinstance(person, Person)


# -- pull and delete, from a local server laid out as the Hub ------------------------


def test_pull_streams_progress_then_lists_shows_and_deletes(
    default_model_path: Path,
    live_server: ServerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = default_model_path.read_bytes()
    paths = Paths(
        home=tmp_path / "home", models_dir=tmp_path / "models", user_models_file=tmp_path / "x"
    ).ensure()
    entry = ModelEntry(
        name="hub-smol",
        source=HfSource(repo="someone/smol-GGUF", file="smol.gguf"),
        sha256=sha256_hex(body),
    )
    with LocalServer() as hub:
        hub.add_hf_file("someone/smol-GGUF", "smol.gguf", body)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        server = live_server(
            ServerSettings(n_threads=2, context=512),
            registry=Registry({"hub-smol": entry}, "hub-smol", paths),
        )
        client = ollama.Client(host=server.url)
        assert client.list().models == []
        with pytest.raises(ollama.ResponseError) as not_pulled:
            client.show("hub-smol")
        assert not_pulled.value.status_code == 404 and "pull" in not_pulled.value.error

        progress = list(client.pull("hub-smol", stream=True))
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert statuses[-4:-1] == ["pulling " + entry.sha256[:12], "verifying sha256 digest",
                                   "writing manifest"]  # fmt: skip
        counts = [p.completed for p in progress if p.completed is not None]
        assert counts == sorted(counts) and counts[-1] == len(body)
        assert {p.total for p in progress if p.total is not None} == {len(body)}

        assert [m.model for m in client.list().models] == ["hub-smol:latest"]
        assert client.show("hub-smol:latest").details.family == "llama"
        assert client.pull("hub-smol").status == "success"  # already here: nothing to fetch
        reply = client.generate(model="hub-smol", prompt="Hi", options=GREEDY)
        assert reply.response

        assert client.delete("hub-smol").status == "success"
        assert client.list().models == [] and client.ps().models == []
        with pytest.raises(ollama.ResponseError) as gone:
            client.delete("hub-smol")
        assert gone.value.status_code == 404


# -- the translation, without a model -------------------------------------------------


def test_messages_and_options_translate_to_openai() -> None:
    body = OllamaChatRequest.model_validate(
        {
            "model": "smollm2-135m:latest",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "a", "arguments": {"x": 1}}},
                        {"function": {"name": "b", "arguments": {}}},
                    ],
                },
                {"role": "tool", "tool_name": "b", "content": "B"},
                {"role": "tool", "content": "A"},
            ],
            "options": {"num_predict": -1, "top_k": 5, "stop": "x", "tfs_z": 1},
            "format": "json",
            "keep_alive": "1m",
        }
    )
    openai, unhonoured = chat_request(body)
    assert openai.model == "smollm2-135m" and model_name("m:latest") == "m"
    assert openai.max_tokens is None and openai.top_k == 5 and openai.stops() == ("x",)
    assert openai.keep_alive_seconds() == 60 and unhonoured == ["tfs_z"]
    assert openai.response_format is not None and openai.response_format.type == "json_object"
    calls = openai.messages[1].model_extra["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {}]
    # results are matched to calls by tool name, else in order
    answers = [m.model_extra["tool_call_id"] for m in openai.messages[2:]]
    assert answers == [calls[1]["id"], calls[0]["id"]]

    orphan = OllamaChatRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "tool", "tool_name": "a", "content": "A"}]}
    )
    with pytest.raises(InvalidRequest) as refused:
        chat_request(orphan)
    assert refused.value.param == "messages[0]" and "no tool call" in str(refused.value)


class _Chunks(ChatStream):
    """A stream of given OpenAI chunks, as the engine path would yield them."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self._chunks = chunks
        self.headers = {}

    async def chunks(self) -> Any:
        for chunk in self._chunks:
            yield chunk


def _delta(**delta: Any) -> dict[str, Any]:
    return {"id": "c", "model": MODEL, "choices": [{"index": 0, "delta": delta}]}


def test_tool_calls_leave_whole_with_object_arguments_and_errors_as_lines() -> None:
    chunks = [
        _delta(role="assistant", content=""),
        _delta(tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "get_weather"}}]),
        _delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        _delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7}, "timings": {}},
    ]

    async def lines(source: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stream = _Lines(MODEL, 0.0, chat=True).stream(_Chunks(source))
        return [json.loads(line) async for line in stream]

    calls, last = asyncio.run(lines(chunks))
    assert calls["message"]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "get_weather",
                                      "arguments": {"city": "Paris"}}}
    ]  # fmt: skip
    assert not calls["done"] and last["done"] and last["done_reason"] == "stop"
    assert last["eval_count"] == 7 and "tool_calls" not in last["message"]

    failing = [_delta(content="Hel"), {"error": {"message": "the engine stopped"}}]
    assert asyncio.run(lines(failing))[-1] == {"error": "the engine stopped"}
