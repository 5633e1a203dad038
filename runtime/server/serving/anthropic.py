"""Anthropic's Messages API (``/v1/messages``) over the one chat path (``chat_stream.py``).

A request is translated into OpenAI's chat request (``chat_request_of``) and runs as any
chat completion does: billed under ``/v1/messages``, limited, on a leased model or a
peer, with tool calls in the model's own format held to their schemas. The answer is
translated back: whole (``message_of``) or event by event (``MessageEvents``), both
pure, so the translation is tested without a model.

How the two APIs meet:

- ``system`` is the first message; a ``tool_result`` block is an OpenAI ``tool`` message
  (an error's text says so: the model reads ``Error: ...``), placed before the turn's
  text, right after the assistant's calls, where every template expects it; a
  ``tool_use`` block is an assistant's tool call with its ``input`` as JSON text.
- ``tool_choice`` ``any`` is OpenAI's ``required``, ``tool`` a named function,
  ``disable_parallel_tool_use`` ``parallel_tool_calls: false``; ``metadata.user_id`` is
  OpenAI's ``user``, the agent a request bills (``X-PC-Agent-ID`` still wins).
- usage: ``input_tokens`` are the prompt's tokens computed, ``cache_read_input_tokens``
  those its cached prefix gave (Anthropic's split: their sum is the prompt);
  ``cache_creation_input_tokens`` is 0, as nothing is charged for caching here.
- a stream's ``message_start`` comes before the prompt is counted, so its usage is 0;
  ``message_delta`` carries every count (the SDK's snapshot takes them from there).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from pcrt.runtime.errors import StreamFailed
from pcrt.runtime.server.forwarding import NativeRequest
from pcrt.runtime.server.http_errors import client_left, in_shape_of
from pcrt.runtime.server.schemas import ChatCompletionRequest, field_refused, refusal
from pcrt.runtime.server.schemas.anthropic import (
    AnthropicMessage,
    AnthropicTool,
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)
from pcrt.runtime.server.services import Services, agent_of
from pcrt.runtime.server.serving.chat_stream import (
    ChatReply,
    ChatStream,
    ReplyBuilder,
    ReplyCall,
    delta_of,
    failure_of,
    fields_named,
)
from pcrt.runtime.server.serving.completions import CompletionsServing, prepare_generation
from pcrt.runtime.sse import encode
from pcrt.runtime.threads import to_thread_to_completion

__all__ = [
    "MESSAGES_ROUTE",
    "AnthropicServing",
    "MessageEvents",
    "chat_request_of",
    "message_of",
]

MESSAGES_ROUTE = "/v1/messages"
Event = tuple[str, dict[str, Any]]  # an SSE event's name and its data


class AnthropicServing:
    """Anthropic's Messages API over the completions' one chat path."""

    def __init__(self, services: Services, completions: CompletionsServing) -> None:
        self.services = services
        self.completions = completions  # the one chat path

    async def create_message(self, body: MessagesRequest, request: Request) -> Any:
        chat = chat_request_of(body)
        native = None
        if self.services.coordinator.enabled:  # a pcrt peer is asked in Anthropic's API
            native = NativeRequest(
                path=MESSAGES_ROUTE,
                body=body.model_dump(mode="json", exclude_unset=True, by_alias=True),
                stream=body.stream,
                usage_of=usage_of_event,
                failed=_failure_event,
            )
        with anthropic_fields():
            stream = await self.completions.stream_or_native(
                request, chat, MESSAGES_ROUTE, chat=True, native=native
            )
        if not isinstance(stream, ChatStream):
            return stream  # a pcrt peer's answer, in Anthropic's shape already
        if body.stream:
            return stream.respond(_sse(stream, body.model), "text/event-stream")
        reply = await stream.reply(request)
        if reply is None:  # the client left; nobody reads this
            return client_left()
        return JSONResponse(message_of(reply, body.model), headers=stream.headers)

    async def count_tokens(self, body: CountTokensRequest, request: Request) -> dict[str, int]:
        """The prompt's tokens as the model reads it: its template, its tokenizer, the
        tools as its template (or pcrt's tool prompt) writes them. Nothing is generated,
        so no tokens are billed; the request counts against the agent's limits (it may
        load a model)."""
        chat = chat_request_of(body)
        self.services.limiter.admit(agent_of(request, chat.user), 0)
        with anthropic_fields():
            async with self.services.pool.lease(chat.model) as model:
                _, tokens, _ = await to_thread_to_completion(
                    prepare_generation, model.engine, chat, True
                )
        return {"input_tokens": len(tokens)}


def usage_of_event(event: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI-style usage out of a message (whole) or its ``message_delta`` event."""
    usage = event.get("usage") if event.get("type") in ("message", "message_delta") else None
    if not isinstance(usage, dict):
        return None
    cached = usage.get("cache_read_input_tokens") or 0
    return {
        "prompt_tokens": (usage.get("input_tokens") or 0) + cached,
        "completion_tokens": usage.get("output_tokens") or 0,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _failure_event(message: str) -> bytes:
    error = {"type": "error", "error": {"type": "api_error", "message": message}}
    return encode(json.dumps(error), event="error").encode()


async def _sse(stream: ChatStream, model: str) -> AsyncGenerator[str, None]:
    """Anthropic's stream, from the OpenAI chunks; a failure mid-stream is an ``error``
    event, as Anthropic's is."""
    events = MessageEvents(model)
    async for chunk in stream.chunks():
        failure = failure_of(chunk)
        translated = events.failed(failure) if failure is not None else events.feed(chunk)
        for name, data in translated:
            yield encode(json.dumps(data, ensure_ascii=False), event=name)
        if failure is not None:
            return
    for name, data in events.finish():
        yield encode(json.dumps(data, ensure_ascii=False), event=name)


# -- the request ------------------------------------------------------------------------


def chat_request_of(body: CountTokensRequest) -> ChatCompletionRequest:
    """The OpenAI chat request an Anthropic one asks for; a 400 names Anthropic's field."""
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages_of(body.system_text(), body.messages),
    }
    if body.tools:
        fields["tools"] = [_function_of(tool) for tool in body.tools]
    if body.tool_choice is not None:
        fields["tool_choice"] = _openai_choice(body.tool_choice)
        fields["parallel_tool_calls"] = not body.tool_choice.disable_parallel_tool_use
    if body.output_config is not None and body.output_config.format is not None:
        schema = body.output_config.format.schema_
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema},
        }
    if isinstance(body, MessagesRequest):
        fields.update(
            max_tokens=body.max_tokens,
            stop=body.stop_sequences,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            user=body.metadata.user_id if body.metadata else None,
        )
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # the checks above let nothing through; never a 500
        raise refusal(exc) from None


def chat_messages_of(
    system: str | None, messages: Sequence[AnthropicMessage]
) -> list[dict[str, Any]]:
    """The conversation as OpenAI's messages."""
    _check_turns(messages)
    chat: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        chat += _user_turn(message) if message.role == "user" else [_assistant_turn(message)]
    return _merged(chat)


def _check_turns(messages: Sequence[AnthropicMessage]) -> None:
    """Anthropic's rules for a conversation, each a 400 that names the block: calls are
    the assistant's, results the user's, each result answers a call of the assistant's
    turn just before, and the last turn is the user's (pcrt does not continue an
    assistant's prefilled answer: Anthropic's 400 for models without prefill)."""
    if messages[-1].role != "user":
        raise field_refused(
            f"messages.{len(messages) - 1}",
            "the last message must be the user's: continuing a prefilled assistant turn "
            "is not supported",
        )
    calls: set[str] = set()  # the tool_use ids of the assistant turn just before
    for i, message in enumerate(messages):
        blocks = message.blocks()
        for j, block in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            if isinstance(block, ToolUseBlock) and message.role != "assistant":
                raise field_refused(where, "tool_use blocks belong to the assistant's turns")
            if isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise field_refused(where, "tool_result blocks belong to the user's turns")
                if block.tool_use_id not in calls:
                    raise field_refused(
                        f"{where}.tool_use_id",
                        f"{block.tool_use_id!r} answers no tool_use block of the assistant "
                        "message just before",
                    )
        calls = {b.id for b in blocks if isinstance(b, ToolUseBlock)}


def _user_turn(message: AnthropicMessage) -> list[dict[str, Any]]:
    blocks = message.blocks()
    results = [_tool_message(b) for b in blocks if isinstance(b, ToolResultBlock)]
    texts = [b.text for b in blocks if isinstance(b, TextBlock)]
    if texts or not results:
        return [*results, {"role": "user", "content": "\n\n".join(texts)}]
    return results


def _tool_message(block: ToolResultBlock) -> dict[str, Any]:
    text = block.text()
    content = f"Error: {text}" if block.is_error else text
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _assistant_turn(message: AnthropicMessage) -> dict[str, Any]:
    blocks = message.blocks()
    text = "\n\n".join(b.text for b in blocks if isinstance(b, TextBlock))
    calls = [
        {
            "id": b.id,
            "type": "function",
            "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)},
        }
        for b in blocks
        if isinstance(b, ToolUseBlock)
    ]
    # thinking blocks are left out: Anthropic drops earlier turns' thinking itself
    turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _merged(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive turns of one speaker as one turn, as Anthropic combines them (some
    templates refuse two user turns in a row)."""
    merged: list[dict[str, Any]] = []
    for message in chat:
        last = merged[-1] if merged else None
        if last is None or last["role"] != message["role"] or message["role"] == "tool":
            merged.append(dict(message))
            continue
        texts = [t for t in (last.get("content"), message.get("content")) if t]
        calls = [*last.get("tool_calls", ()), *message.get("tool_calls", ())]
        last["content"] = "\n\n".join(texts) or (None if calls else "")
        if calls:
            last["tool_calls"] = calls
    return merged


def _function_of(tool: AnthropicTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _openai_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# the OpenAI fields the shared checks name, as the Anthropic request calls them
_FIELD_NAMES = (
    (re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools.\1.input_schema"),
    (re.compile(r"tools\[(\d+)\]\.function\.name"), r"tools.\1.name"),
    (re.compile(r"response_format\.json_schema\.schema"), "output_config.format.schema"),
)


def anthropic_fields() -> AbstractContextManager[None]:
    """pcrt's errors raised within, naming Anthropic's fields (the shared chat path checks
    the translated request, and would name OpenAI's)."""
    return fields_named(_FIELD_NAMES)


# -- the answer ---------------------------------------------------------------------------


def message_id(chat_id: str) -> str:
    """Anthropic's message id for the chat completion's (the same generation's id)."""
    return "msg_" + (chat_id.removeprefix("chatcmpl-") or "pcrt")


def stop_reason_of(reply: ChatReply) -> str:
    if reply.finish_reason == "length":
        return "max_tokens"
    if reply.finish_reason == "tool_calls" or reply.calls:
        return "tool_use"
    return "stop_sequence" if reply.stop_sequence is not None else "end_turn"


def usage_of(reply: ChatReply) -> dict[str, int]:
    return {
        "input_tokens": reply.prompt_tokens - reply.cached_tokens,
        "output_tokens": reply.completion_tokens,
        "cache_read_input_tokens": reply.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def tool_use_block(call: ReplyCall) -> dict[str, Any]:
    # pcrt's calls are held to their schema (an object); a peer's unparsable text stays
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.parsed_arguments()}


def message_of(reply: ChatReply, model: str) -> dict[str, Any]:
    """The whole answer as Anthropic's message; ``model``: the one asked, when the answer
    does not name it."""
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    content += [tool_use_block(call) for call in reply.calls]
    stop_reason = stop_reason_of(reply)
    return {
        "id": message_id(reply.id),
        "type": "message",
        "role": "assistant",
        "model": reply.model or model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": reply.stop_sequence if stop_reason == "stop_sequence" else None,
        "usage": usage_of(reply),
    }


class MessageEvents:
    """OpenAI's chat chunks in, Anthropic's stream events out, in Anthropic's order:
    ``message_start``, ``ping``, then per content block (text, or one per tool call)
    ``content_block_start``, its deltas (``text_delta``, ``input_json_delta``) and
    ``content_block_stop``, then ``message_delta`` (stop reason, usage) and
    ``message_stop``. Pure: it only reads the chunks it is fed."""

    def __init__(self, model: str) -> None:
        self.model = model  # the one asked, until a chunk names the one that ran
        self.answer = ReplyBuilder()  # the finish, the stop string, the usage
        self._started = False
        self._open: int | None = None  # the block that takes deltas now
        self._blocks = 0  # blocks started so far
        self._text_block: int | None = None  # the open block, when it is text
        self._call_blocks: dict[int, int] = {}  # an OpenAI call's index: its block

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        events = self._start(chunk)
        self.answer.feed(chunk)
        delta = delta_of(chunk)
        if delta is None:
            return events
        if delta.text:
            events += self._text(delta.text)
        for call in delta.calls:
            events += self._call(call)
        if delta.finish_reason:
            events += self._close()
        return events

    def finish(self) -> list[Event]:
        """The events after the last chunk."""
        events = self._start({}) + self._close()
        reply = self.answer.reply()
        stop_reason = stop_reason_of(reply)
        stop_sequence = reply.stop_sequence if stop_reason == "stop_sequence" else None
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        events.append(
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_of(reply)})
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def failed(self, failure: StreamFailed) -> list[Event]:
        """A failure mid-stream: Anthropic's ``error`` event ends the stream."""
        return [("error", in_shape_of(MESSAGES_ROUTE, failure.status, failure.body))]

    def _start(self, chunk: Mapping[str, Any]) -> list[Event]:
        if self._started:
            return []
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(str(chunk.get("id") or "")),
            "type": "message",
            "role": "assistant",
            "model": str(chunk.get("model") or self.model),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # counted once the prompt is: message_delta has the real numbers
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [
            ("message_start", {"type": "message_start", "message": message}),
            ("ping", {"type": "ping"}),
        ]

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._text_block is None:
            events += self._close()
            self._text_block = self._begin({"type": "text", "text": ""}, events)
        delta = {"type": "text_delta", "text": text}
        events.append(_block_delta(self._text_block, delta))
        return events

    def _call(self, call: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        index = int(call.get("index", len(self._call_blocks)))
        function = call.get("function") or {}
        if index not in self._call_blocks:
            events += self._close()
            header = {
                "type": "tool_use",
                "id": str(call.get("id") or f"toolu_{self._blocks}"),
                "name": str(function.get("name") or ""),
                "input": {},
            }
            self._call_blocks[index] = self._begin(header, events)
        arguments = str(function.get("arguments") or "")
        if arguments:
            # a call's arguments follow its header; calls are written one after another
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(_block_delta(self._call_blocks[index], delta))
        return events

    def _begin(self, block: dict[str, Any], events: list[Event]) -> int:
        index, self._open = self._blocks, self._blocks
        self._blocks += 1
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        return index

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, self._open, self._text_block = self._open, None, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]


def _block_delta(index: int, delta: dict[str, Any]) -> Event:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
