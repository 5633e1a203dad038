"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) on the real
default model, over real HTTP on loopback, driven by the official ``anthropic`` SDK with
nothing changed but its base URL: messages whole and streamed (the SDK's helper, and the
raw events in Anthropic's exact order), forced tool calls valid against their schemas, a
tool-result turn, stop sequences, token counts, the agent a request bills, and errors in
Anthropic's shape as the SDK raises them.

The translation both ways (Anthropic's request to OpenAI's chat request, OpenAI's chunks
to Anthropic's events) is pure and tested here without a model first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from pcrt.runtime.engine.textstream import TextStream
from pcrt.runtime.errors import InvalidRequest, StreamFailed
from pcrt.runtime.server.schemas.anthropic import MessagesRequest
from pcrt.runtime.server.serving.anthropic import MessageEvents, chat_request_of
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
    {"name": "get_weather", "description": "The weather in a city now.", "input_schema": WEATHER},
    {
        "name": "get_time",
        "description": "The local time in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]
# the SDK's create() no longer takes sampling fields (newer Claude models ignore them);
# older clients send them, and pcrt honours them: greedy, for answers a test can repeat
GREEDY = {"temperature": 0}


# -- the translation, without a model ---------------------------------------------------


def _request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": MODEL, "max_tokens": 8, **fields})


def test_a_conversation_becomes_openais_messages() -> None:
    body = _request(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "user", "content": [{"type": "text", "text": "In Paris."}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And?"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "no clock"}],
                        "is_error": True,
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            },
        ],
    )
    messages = [m.model_dump(exclude_none=True) for m in chat_request_of(body).messages]
    assert messages == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Weather?\n\nIn Paris."},  # one turn, as Anthropic's
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"a": 1}'},
                }
            ],
        },
        # the result right after its call, before the turn's text
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no clock"},
        {"role": "user", "content": "And?"},
    ]


def test_tools_choices_and_sampling_become_openais_fields() -> None:
    body = _request(
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.5,
        top_k=3,
        metadata={"user_id": "someone"},
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
    )
    chat = chat_request_of(body)
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools is not None and chat.tools[0].function.parameters == WEATHER
    assert (chat.stop, chat.temperature, chat.top_k, chat.user) == (["END"], 0.5, 3, "someone")
    assert chat.max_tokens == 8 and chat.output_schema() == {"type": "object"}
    named = chat_request_of(
        _request(messages=ASK, tools=TOOLS, tool_choice={"type": "tool", "name": "get_time"})
    )
    assert named.tool_choice is not None and not isinstance(named.tool_choice, str)
    assert named.tool_choice.function.name == "get_time" and named.parallel_tool_calls


@pytest.mark.parametrize(
    ("messages", "named"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}],
            "messages.1",
        ),
        (
            [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}],
            "messages.0.content.0.tool_use_id",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}],
                },
            ],
            "messages.0.content.0",
        ),
    ],
)
def test_a_broken_conversation_is_refused_naming_the_block(messages: list[Any], named: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat_request_of(_request(messages=messages))
    assert info.value.param == named


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-abc", "model": MODEL, "choices": choices, **extra}


def test_openai_chunks_become_anthropics_events_in_order() -> None:
    events = MessageEvents(MODEL)
    header = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Let me "}),
        _chunk({"content": "see."}),
        _chunk({"tool_calls": [header]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk({}, "tool_calls"),
        _chunk(
            usage={
                "prompt_tokens": 30,
                "completion_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 12},
            }
        ),
    ]
    out = [event for chunk in chunks for event in events.feed(chunk)] + events.finish()
    assert [name for name, _ in out] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in out)
    assert out[0][1]["message"]["id"] == "msg_abc"
    assert out[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert out[6][1]["index"] == 1 and out[6][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_time",
        "input": {},
    }
    partial = "".join(
        d["delta"]["partial_json"] for n, d in out if n == "content_block_delta" and d["index"] == 1
    )
    assert json.loads(partial) == {"city": "Paris"}
    assert out[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert out[-2][1]["usage"] == {
        "input_tokens": 18,
        "output_tokens": 9,
        "cache_read_input_tokens": 12,
        "cache_creation_input_tokens": 0,
    }


def test_a_failure_mid_stream_is_anthropics_error_event() -> None:
    events = MessageEvents(MODEL)
    events.feed(_chunk({"role": "assistant", "content": ""}))
    body = {
        "error": {
            "message": "the peer went away",
            "type": "server_error",
            "code": "peer_unavailable",
        }
    }
    [(name, data)] = events.failed(StreamFailed("x", status=502, body=body))
    assert name == "error"
    assert data == {
        "type": "error",
        "error": {"type": "api_error", "message": "the peer went away"},
    }


def test_the_text_stream_names_the_stop_string_that_ended_it() -> None:
    stream = TextStream(("zz", "END", "E"))
    assert stream.feed(b"abc EN") == "abc "  # "EN" may begin "END": held back
    assert stream.feed(b"D more") == "" and stream.stopped
    assert stream.stopped_by == "E"  # the first to begin wins (here "E" and "END" tie)


# -- the daemon, with the SDK ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=2048, n_threads=2, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=HELLO)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == MODEL
    assert [block.type for block in message.content] == ["text"] and _text(message)
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert 0 < usage.output_tokens <= 16 and usage.input_tokens > 0
    assert usage.cache_read_input_tokens is not None and usage.cache_creation_input_tokens == 0


def test_a_streamed_message_is_the_same_message(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Count to five."}]
    whole = client.messages.create(model=MODEL, max_tokens=24, extra_body=GREEDY, messages=ask)
    with client.messages.stream(
        model=MODEL, max_tokens=24, extra_body=GREEDY, messages=ask
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == _text(whole) == _text(final)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # the same prompt twice: the second came from the prefix cache, and says so
    prompt = whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0)
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == prompt
    assert final.usage.cache_read_input_tokens


def test_raw_stream_events_come_in_anthropics_order(server: LiveServer) -> None:
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0, "messages": HELLO, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = [part.split("\n") for part in raw.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    data = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert all(lines[0].startswith("event: ") for lines in events)
    assert [d["type"] for d in data] == names  # each event's data names it too
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert data[2]["content_block"] == {"type": "text", "text": ""}
    assert all(d["delta"]["type"] == "text_delta" for d in data[3:-3])
    final = data[-2]
    assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    usage = final["usage"]
    assert 0 < usage["output_tokens"] <= 12
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] > 0
    assert data[0]["message"]["content"] == [] and data[0]["message"]["id"].startswith("msg_")


def test_a_named_tool_is_called_with_valid_input(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=64,
        extra_body=GREEDY,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    calls = [block for block in message.content if block.type == "tool_use"]
    assert [call.name for call in calls] == ["get_weather"]
    assert calls[0].id and isinstance(calls[0].input, dict)
    jsonschema.validate(calls[0].input, WEATHER)


def test_a_streamed_tool_call_is_input_json_deltas(client: anthropic.Anthropic) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "extra_body": GREEDY,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    whole = client.messages.create(**args)
    events = list(client.messages.create(stream=True, **args))
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"]
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    partial = "".join(d.partial_json for d in deltas if d.type == "input_json_delta")
    [call] = [block for block in whole.content if block.type == "tool_use"]
    assert json.loads(partial) == call.input
    [delta] = [e for e in events if e.type == "message_delta"]
    assert delta.delta.stop_reason == "tool_use"


def test_any_tool_without_parallel_use_is_one_valid_call(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=64,
        extra_body=GREEDY,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    [call] = [block for block in message.content if block.type == "tool_use"]
    schema = next(t["input_schema"] for t in TOOLS if t["name"] == call.name)
    jsonschema.validate(call.input, schema)
    assert message.stop_reason == "tool_use"


def test_a_tool_result_turn_is_answered_in_text(client: anthropic.Anthropic) -> None:
    called = client.messages.create(
        model=MODEL,
        max_tokens=64,
        extra_body=GREEDY,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    [call] = [block for block in called.content if block.type == "tool_use"]
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump() for block in called.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C."}],
        },
    ]
    answer = client.messages.create(
        model=MODEL,
        max_tokens=32,
        extra_body=GREEDY,
        messages=history,
        tools=TOOLS,
        tool_choice={"type": "none"},
    )
    assert _text(answer) and all(block.type == "text" for block in answer.content)
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_a_stop_sequence_ends_the_message_and_is_named(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Count from one to ten in words."}]
    free = _text(
        client.messages.create(model=MODEL, max_tokens=32, extra_body=GREEDY, messages=ask)
    )
    words = free.split()
    assert len(words) > 3, free
    stop = words[2]  # a word the model writes, not at its start
    cut = client.messages.create(
        model=MODEL, max_tokens=32, extra_body=GREEDY, messages=ask, stop_sequences=["@@@", stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert _text(cut) == free[: free.index(stop)]
    with client.messages.stream(
        model=MODEL, max_tokens=32, extra_body=GREEDY, messages=ask, stop_sequences=[stop]
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, _text(final)) == (
        "stop_sequence",
        stop,
        _text(cut),
    )


def test_count_tokens_counts_what_the_model_reads(client: anthropic.Anthropic) -> None:
    def count(**fields: Any) -> int:
        return client.messages.count_tokens(model=MODEL, **fields).input_tokens

    short = count(messages=HELLO)
    longer = count(messages=[{"role": "user", "content": "Say hello to everyone in the room."}])
    with_tools = count(messages=HELLO, tools=TOOLS)
    assert 0 < short < longer and short < with_tools
    # (without a system, SmolLM2's template writes its own: compare two systems)
    terse = count(messages=HELLO, system="Be terse.")
    terser = count(messages=HELLO, system="Be terse. Answer in one line, and never apologize.")
    assert terse < terser
    # the prompt a message is generated from, to the token
    message = client.messages.create(model=MODEL, max_tokens=1, messages=HELLO, tools=TOOLS)
    used = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert used == with_tools


def test_metadata_user_id_is_the_agent_unless_the_header_names_one(
    client: anthropic.Anthropic, server: LiveServer
) -> None:
    """The SDK authenticates with X-Api-Key; each message is one usage row of its agent,
    under Anthropic's route, with Anthropic's usage split back into the prompt's tokens."""
    made = client.messages.create(
        model=MODEL, max_tokens=4, messages=HELLO, metadata={"user_id": "claude-user"}
    )
    with client.messages.stream(
        model=MODEL, max_tokens=4, messages=HELLO, metadata={"user_id": "claude-user"}
    ) as stream:
        streamed = stream.get_final_message()
    client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=HELLO,
        metadata={"user_id": "overridden"},
        extra_headers={"X-PC-Agent-ID": "header-agent"},
    )
    rows = server.usage_rows("claude-user")
    assert [(r["route"], r["status"]) for r in rows] == [("/v1/messages", 200)] * 2
    for row, message in zip(rows, (made, streamed), strict=True):
        cached = message.usage.cache_read_input_tokens or 0
        assert row["prompt_tokens"] == message.usage.input_tokens + cached
        assert row["cached_tokens"] == cached
        assert row["completion_tokens"] == message.usage.output_tokens
    assert [r["route"] for r in server.usage_rows("header-agent")] == ["/v1/messages"]
    assert server.usage_rows("overridden") == []


# -- errors, in Anthropic's shape ---------------------------------------------------------


def _error(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    error: dict[str, Any] = body["error"]
    return error


def test_an_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope", max_tokens=4, messages=HELLO)
    assert _error(info.value)["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=HELLO)


def test_a_wrong_key_is_an_authentication_error(server: LiveServer) -> None:
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
    assert _error(info.value)["type"] == "authentication_error"


def test_invalid_fields_are_bad_requests_naming_them(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL, max_tokens=4, messages=HELLO, extra_body={"temperature": 1.5}
        )
    error = _error(info.value)
    assert error["type"] == "invalid_request_error" and "temperature" in error["message"]
    deep: dict[str, Any] = {"type": "object", "properties": {}}
    for _ in range(70):  # past the schema bounds: refused before any compile
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=ASK,
            tools=[{"name": "deep", "input_schema": deep}],
            tool_choice={"type": "any"},
        )
    assert "tools.0.input_schema" in _error(info.value)["message"]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "nope"},
        )
    assert "tool_choice" in _error(info.value)["message"]


def test_max_tokens_is_required(server: LiveServer) -> None:
    headers = {"X-Api-Key": KEY}
    with server.http() as http:
        response = http.post(
            "/v1/messages", json={"model": MODEL, "messages": HELLO}, headers=headers
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]


@pytest.mark.parametrize(
    ("block", "named"),
    [
        (
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
            },
            "images",
        ),
        (
            {
                "type": "document",
                "source": {"type": "text", "media_type": "text/plain", "data": "x"},
            },
            "documents",
        ),
    ],
)
def test_blocks_a_text_model_cannot_read_are_refused_by_name(
    client: anthropic.Anthropic, block: dict[str, Any], named: str
) -> None:
    content: list[Any] = [{"type": "text", "text": "What is this?"}, block]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": content}]
        )
    message = _error(info.value)["message"]
    assert named in message and "messages.0.content: block 1" in message
    result = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [block]}]
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}],
        },
        {"role": "user", "content": result},
    ]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=4, messages=history)
    assert named in _error(info.value)["message"]


def test_server_tools_are_refused_by_name(client: anthropic.Anthropic) -> None:
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=4, messages=ASK, tools=[search])  # type: ignore[list-item]
    assert "web_search_20250305" in _error(info.value)["message"]


def test_a_block_whose_type_is_not_a_string_is_a_400(server: LiveServer) -> None:
    """What schemathesis sent: a tool result's block typed by an object, not a name."""
    odd = [{"type": "tool_result", "tool_use_id": "0", "content": [{"type": {}, "text": ""}]}]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        answer = httpx.post(
            server.url + path,
            json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": odd}]},
            headers={"x-api-key": KEY},
            timeout=30,
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_request_error"
