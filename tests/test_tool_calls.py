"""OpenAI tool calling on the real default model (SmolLM2: no tool template, so the
generic JSON call format), driven by the official SDK and LangChain over HTTP: forced and
named calls that always parse and validate, streamed in OpenAI's delta shape, a
tool-result turn, ``auto`` and ``none``, ``parallel_tool_calls``, and every malformed
tool a 400 naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.server.schemas import ToolDefinition
from pcrt.runtime.server.serving.tool_calls import StreamedReply, ToolPlan
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping", "description": "Is the service up?"}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
DEEP: dict[str, Any] = {"type": "object", "properties": {}}
for _ in range(70):  # past the schema bounds' 64 levels: refused before any compile
    DEEP = {"type": "object", "properties": {"x": DEEP}}


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=2048, n_threads=2, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def _parameters(name: str) -> dict[str, Any]:
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    return tool["function"].get("parameters") or {"type": "object"}


def test_a_required_call_parses_and_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        name = call.function.name
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, _parameters(name))


@pytest.mark.parametrize("name", ["get_time", "ping"])
def test_a_named_call_is_that_tool(client: openai.OpenAI, name: str) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": name}},
        temperature=0,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == [name] * len(calls) and calls
    if name == "ping":  # a tool without parameters: "{}"
        assert json.loads(calls[0].function.arguments) == {}


def test_a_streamed_call_comes_in_openais_deltas(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
    }
    whole = client.chat.completions.create(**args)
    deltas: list[Any] = []
    finish = None
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            assert not choice.delta.content  # no call markup as content, ever
            deltas.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function is not None and first.function.name == "get_weather"
    assert first.function.arguments == ""
    assert all(d.id is None and d.function and d.function.name is None for d in rest)
    streamed = "".join(d.function.arguments or "" for d in rest if d.function)
    expected = whole.choices[0].message.tool_calls[0]
    assert streamed == expected.function.arguments


def test_a_tool_result_turn_is_answered(client: openai.OpenAI) -> None:
    call = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0
    )
    made = call.choices[0].message
    assert made.tool_calls
    history: list[Any] = [
        *ASK,
        made.model_dump(exclude_none=True),
        *(
            {"role": "tool", "tool_call_id": c.id, "content": '{"sky": "sunny", "c": 21}'}
            for c in made.tool_calls
        ),
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=40
    )
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_auto_answers_in_text_when_the_model_does(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=TOOLS,
        tool_choice="auto",
        temperature=0,
        max_tokens=30,
    )
    choice = reply.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    assert len(reply.choices[0].message.tool_calls or []) == 1


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    unit: str


def test_langchain_binds_tools_and_structures_output_through_calls(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=server.url + "/v1", api_key=KEY, model=MODEL, temperature=0, max_retries=0
    )
    message = chat.bind_tools([Weather], tool_choice="any").invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    weather = chat.with_structured_output(Weather, method="function_calling").invoke(
        "Weather in Paris, in celsius?"
    )
    assert isinstance(weather, Weather)


def _post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    with server.http() as h:
        return h.post("/v1/chat/completions", json={"model": MODEL, **body})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools.0"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]},
            "tools.0",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": TOOLS,
                "messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}],
            },
            "messages[1].tool_call_id",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"not": {}}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters.properties.a.not",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
    ],
)
def test_malformed_tools_are_400s_naming_the_field(
    server: LiveServer, body: dict[str, Any], param: str
) -> None:
    r = _post(server, {"messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.text


# -- the reply's shaping, without a model ---------------------------------------------------


def _plan(choice: str = "required") -> ToolPlan:
    return ToolPlan(tuple(ToolDefinition.model_validate(t) for t in TOOLS), choice, True)


def test_the_reader_follows_calls_as_they_are_written() -> None:
    text = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa"}}, {"name": "pi'
    reply = _plan().reply(text)
    assert [(c.name, c.arguments, c.complete) for c in reply.calls] == [
        ("get_weather", '{"city": "Pa"}', True)
    ]
    reply = _plan().reply(text + 'ng", "arguments": {"a": "}{\\""')
    assert reply.calls[1].name == "ping" and not reply.calls[1].complete
    assert reply.calls[1].arguments == '{"a": "}{\\""'


def test_auto_holds_back_what_may_begin_a_call_and_streams_the_rest() -> None:
    content = StreamedReply(_plan("auto"))
    assert content.feed("{") == [] and content.feed(" hi") == [{"content": "{ hi"}]
    assert content.finish("stop") == ([], "stop")
    partial = StreamedReply(_plan("auto"))
    assert partial.feed('Sure. {"tool_') == [{"content": "Sure. "}]
    assert partial.finish("length") == ([{"content": '{"tool_'}], "length")
    call = StreamedReply(_plan("auto"))
    deltas = call.feed('Sure. {"tool_calls": [{"name": "ping", "arguments": {')
    assert deltas[0] == {"content": "Sure. "}
    assert deltas[1]["tool_calls"][0]["function"] == {"name": "ping", "arguments": ""}
    assert deltas[2]["tool_calls"][0]["function"] == {"arguments": "{"}
    deltas, reason = call.finish("stop")
    assert reason == "stop" and deltas == []  # cut inside the call: not a call
    whole = StreamedReply(_plan("auto"))
    deltas = whole.feed('{"tool_calls": [{"name": "ping", "arguments": {}}]}')
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "ping", "arguments": ""}
    assert deltas[1]["tool_calls"][0]["function"] == {"arguments": "{}"}
    assert whole.finish("stop") == ([], "tool_calls")


def test_history_is_written_as_the_model_writes_calls() -> None:
    """Earlier calls become the call JSON, after any text the assistant wrote with them;
    the tools' block joins the system message; tool results keep their role."""
    function = {"name": "get_time", "arguments": '{"city": "Oslo"}'}
    call = {"id": "call_1", "type": "function", "function": function}
    history = [
        ChatMessage.model_validate(m)  # extras (tool_calls, tool_call_id) as the API has them
        for m in (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Time in Oslo?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
            {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
        )
    ]
    written = _plan("auto").messages(history)
    assert written[0].role == "system" and written[0].text().startswith("Be brief.\n\n")
    assert "get_weather" in written[0].text() and len(written) == 4
    assert written[2].text() == (
        'Let me look.\n{"tool_calls": [{"name": "get_time", "arguments": {"city": "Oslo"}}]}'
    )
    assert written[3] == history[3]
    assert [m.role for m in _plan("none").messages(history)] == [m.role for m in history]
    assert "get_weather" not in _plan("none").messages(history)[0].text()


def test_a_streamed_call_carries_its_tokens_logprobs_as_it_goes(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    with_logprobs, entries, usage = 0, 0, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                with_logprobs += 1
                entries += len(c.logprobs.content)
    assert usage is not None and entries == usage.completion_tokens
    assert with_logprobs > 1  # as the call is written, not all at its end
