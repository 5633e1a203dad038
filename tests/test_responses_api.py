"""OpenAI's Responses API (``/v1/responses``): the translations on their own (a request
into OpenAI's chat request, chat chunks into the typed events, the bounded store of
responses), then the real default model over real HTTP, driven by the official SDK's
``client.responses`` unchanged but for its address: text, instructions, streamed events
in their exact order, the SDK's stream helper, a function call round trip, a JSON schema,
a stored conversation continued, refusals of what cannot be honoured, and
``max_output_tokens`` as an incomplete response."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from pcrt.cache.responses import ResponseStore, StoredResponse
from pcrt.cache.store import Store
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.server.schemas import NamedToolChoice
from pcrt.runtime.server.schemas.responses import ResponsesRequest
from pcrt.runtime.server.serving.responses_input import chat_request, responses_param
from pcrt.runtime.server.serving.responses_output import ResponseEvents, response_shell
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
FAST: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_output_tokens": 24}


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": MODEL, **fields})


def refusal(body: ResponsesRequest) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        chat_request(body)
    return caught.value


# -- a request as OpenAI's chat request ---------------------------------------------------


def test_text_and_instructions_are_a_system_and_a_user_message() -> None:
    translated = chat_request(request(input="Hi there", instructions="Be brief."))
    chat = translated.chat
    assert [(m.role, m.text()) for m in chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    # the instructions are not part of the conversation a stored response keeps
    assert translated.conversation == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}
    ]


def test_items_become_one_assistant_turn_with_its_calls_and_their_results() -> None:
    body = request(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        max_output_tokens=32,
        user="agent-7",
    )
    chat = chat_request(body).chat
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "tool"]
    turn = chat.messages[1]
    assert turn.text() == "Let me look."
    assert [c["id"] for c in (turn.model_extra or {})["tool_calls"]] == ["c1", "c2"]
    assert [(m.model_extra or {})["tool_call_id"] for m in chat.messages[2:]] == ["c1", "c2"]
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == WEATHER_TOOL["parameters"]
    assert isinstance(chat.tool_choice, NamedToolChoice)
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.output_schema() == {"type": "object"}
    assert chat.max_tokens == 32 and chat.user == "agent-7"


def test_a_previous_conversation_comes_before_the_input() -> None:
    earlier = [
        {"type": "message", "role": "user", "content": "My name is Ada."},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi"}],
        },
    ]
    translated = chat_request(request(input="Who am I?"), earlier)
    assert [m.text() for m in translated.chat.messages] == ["My name is Ada.", "Hi", "Who am I?"]
    assert len(translated.conversation) == 3


@pytest.mark.parametrize(
    ("fields", "param", "named"),
    [
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "'reasoning'"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "item_reference"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "what is this?"},
                            {"type": "input_image", "image_url": "https://x/y.png"},
                        ],
                    }
                ]
            },
            "input[0].content[1].type",
            "'input_image'",
        ),
        (
            {"input": "hi", "tools": [{"type": "web_search_preview"}]},
            "tools[0].type",
            "'web_search_preview'",
        ),
        (
            {"input": "hi", "tool_choice": {"type": "file_search"}},
            "tool_choice",
            "'file_search'",
        ),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", "call_id"),
        ({"input": []}, "input", "no input"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(
    fields: dict[str, Any], param: str, named: str
) -> None:
    refused = refusal(request(**fields))
    assert refused.param == param
    assert named in str(refused)


def test_chat_fields_in_errors_are_renamed_as_this_apis() -> None:
    assert responses_param("tools[2].function.parameters.x") == "tools[2].parameters.x"
    assert responses_param("response_format.json_schema.schema.a.b") == "text.format.schema.a.b"
    assert responses_param("messages[3].tool_call_id") == "input"
    assert responses_param("tool_choice") == "tool_choice"


# -- chat chunks as the typed events ------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict:
    return {
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        **extra,
    }


def run_events(chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    events = ResponseEvents(response_shell(request(input="x"), "resp_1", 0))
    out = events.started()
    for c in chunks:
        out += events.feed(c)
    out += events.finished()
    return out, events.response


def test_text_then_a_call_nest_as_openais_events() -> None:
    header = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "f"}}
    fragment = {"index": 0, "function": {"arguments": '{"a": 1}'}}
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "prompt_tokens_details": {}}
    events, response = run_events(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({"tool_calls": [header]}),
            chunk({"tool_calls": [fragment]}),
            chunk(finish="tool_calls"),
            {"model": MODEL, "choices": [], "usage": usage},
        ]
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["output"] == []  # a snapshot, not the growing object
    message, call = response["output"]
    assert message["content"][0]["text"] == "Hello" and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_9", "f", '{"a": 1}')
    assert response["status"] == "completed"
    assert response["usage"]["input_tokens"] == 7 and response["usage"]["total_tokens"] == 12


def test_a_reply_cut_at_max_tokens_is_incomplete() -> None:
    events, response = run_events([chunk({"content": "Once upon"}), chunk(finish="length")])
    assert events[-1]["type"] == "response.incomplete"
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_a_failure_mid_way_is_an_error_event_then_response_failed() -> None:
    events = ResponseEvents(response_shell(request(input="x"), "resp_1", 0))
    events.started()
    events.feed(chunk({"content": "Hal"}))
    failed = events.failed("the engine stopped", "engine_closed")
    assert [e["type"] for e in failed] == ["error", "response.failed"]
    assert failed[0]["message"] == "the engine stopped"
    assert failed[1]["response"]["status"] == "failed"
    assert failed[1]["response"]["error"]["code"] == "engine_closed"


# -- the store of responses ---------------------------------------------------------------


def stored(n: int) -> StoredResponse:
    conversation = [{"type": "message", "role": "user", "content": f"turn {n}"}]
    output = [{"type": "message", "role": "assistant", "content": []}]
    return StoredResponse(
        f"resp_{n}", "a", MODEL, conversation, {"id": f"resp_{n}", "output": output}
    )


def test_the_store_keeps_the_newest_responses_only(store: Store) -> None:
    responses = ResponseStore(store, kept=3)
    for n in range(5):
        responses.put(stored(n))
    assert responses.count() == 3
    assert responses.get("resp_1") is None
    kept = responses.get("resp_4")
    assert kept is not None and kept.continued() == [
        *stored(4).conversation,
        *stored(4).response["output"],
    ]
    assert responses.delete("resp_4") and not responses.delete("resp_4")
    assert responses.get("resp_4") is None


# -- the real model, through the SDK ------------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=2048, n_threads=2, queue_size=4, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def test_text_with_instructions(server: LiveServer, client: openai.OpenAI) -> None:
    response = client.responses.create(
        input="Say hello.", instructions="You are a friendly assistant.", user="greeter", **FAST
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text and response.output_text == message.content[0].text
    usage = response.usage
    assert usage is not None and 0 < usage.output_tokens <= 24
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.instructions == "You are a friendly assistant."
    # billed under its own route, to the agent it names
    rows = server.usage_rows("greeter")
    assert [(r["route"], r["status"]) for r in rows] == [("/v1/responses", 200)]
    assert rows[0]["completion_tokens"] == usage.output_tokens


def test_streamed_events_come_in_order_and_add_up(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"input": "Count to five.", **FAST}
    whole = client.responses.create(**args)
    events = list(client.responses.create(stream=True, **args))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 0
    last = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text  # temperature 0: the same answer either way
    final = events[-1].response
    assert final.output_text == text and final.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens
    # the prompt again: its prefix came from the cache
    assert final.usage.input_tokens_details.cached_tokens > 0


def test_each_event_is_named_on_its_sse_event_line(server: LiveServer) -> None:
    body = {"input": "Say hello.", "stream": True, **FAST}
    with server.http() as http, http.stream("POST", "/v1/responses", json=body) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    named = [line.removeprefix("event: ") for line in lines[0::2]]
    data = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert len(named) == len(data) > 4
    assert named == [d["type"] for d in data]


def test_the_sdks_stream_helper_gets_the_final_response(client: openai.OpenAI) -> None:
    text = ""
    # enough tokens for the answer to end: the helper's final response is a completed one
    with client.responses.stream(
        input="Say hello.", model=MODEL, temperature=0, max_output_tokens=64
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert final.status == "completed"
    assert text and final.output_text == text


def test_a_function_call_round_trip(client: openai.OpenAI) -> None:
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = client.responses.create(
        input=ask, tools=[WEATHER_TOOL], tool_choice="required", model=MODEL, temperature=0
    )
    assert called.status == "completed"
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_TOOL["parameters"])
    results = [
        {"type": "function_call_output", "call_id": c.call_id, "output": '{"sky": "sunny"}'}
        for c in calls
    ]
    answered = client.responses.create(
        input=[*ask, *(c.model_dump(exclude_none=True) for c in calls), *results],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        **FAST,
    )
    assert answered.output_text
    assert all(item.type == "message" for item in answered.output)
    # the call and its result were read: the prompt holds more than the question did
    assert answered.usage.input_tokens > called.usage.input_tokens


def test_a_streamed_call_comes_as_function_call_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            input="What is the weather in Oslo?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            model=MODEL,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    fragments = kinds.count("response.function_call_arguments.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * fragments,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-3]
    assert done.type == "response.function_call_arguments.done"
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert done.arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["parameters"])


def test_json_schema_output_parses_against_its_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        input="Invent a person.",
        text={
            "format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
        },
        model=MODEL,
        temperature=0,
        max_output_tokens=64,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)


def test_a_stored_response_is_continued_read_and_deleted(client: openai.OpenAI) -> None:
    first = client.responses.create(input="My name is Ada. Remember it.", **FAST)
    second = client.responses.create(
        input="What is my name?", previous_response_id=first.id, **FAST
    )
    assert second.previous_response_id == first.id
    # the first turn (its input and its answer) was read before the new input
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    fetched = client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    client.responses.delete(first.id)  # the SDK raises on any status but a 2xx
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # the continuation holds the whole conversation: deleting the first does not break it
    third = client.responses.create(input="Thanks.", previous_response_id=second.id, **FAST)
    assert third.usage.input_tokens > second.usage.input_tokens


def test_a_response_not_stored_cannot_be_continued(client: openai.OpenAI) -> None:
    unstored = client.responses.create(input="Hello.", store=False, **FAST)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(input="Again.", previous_response_id=unstored.id, **FAST)
    assert caught.value.body["param"] == "previous_response_id"
    assert unstored.id in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_an_unknown_input_item_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            input=[
                {"role": "user", "content": "Hi"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
            **FAST,
        )
    assert caught.value.body["param"] == "input[1].type"
    assert "reasoning" in caught.value.body["message"]


def test_a_bad_tool_schema_is_a_400_naming_this_apis_field(client: openai.OpenAI) -> None:
    bad = {**WEATHER_TOOL, "parameters": {"type": "object", "properties": {"x": {"type": 7}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(input="Hi", tools=[bad], tool_choice="required", **FAST)
    assert caught.value.body["param"].startswith("tools[0].parameters")


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "input": "Write a long story about a dragon and a knight.",
        "model": MODEL,
        "temperature": 0,
        "max_output_tokens": 16,
    }
    response = client.responses.create(**args)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 16
    assert response.output[0].status == "incomplete"
    events = list(client.responses.create(stream=True, **args))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == response.output_text
