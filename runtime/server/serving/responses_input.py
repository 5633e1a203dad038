"""A Responses API request as OpenAI's chat request (pure: no I/O, no model).

``input`` (text, or items: messages, function calls, their outputs) after the
conversation a ``previous_response_id`` continues becomes ``messages``; the flat function
``tools``, ``tool_choice`` and ``text.format`` become their nested chat shapes. What pcrt
cannot honour (an image or file part, a reasoning item, a built-in tool) is a 400 that
names it and its place: never dropped, or the model would answer a request it never saw.

Errors the chat path raises name chat fields (``response_format.json_schema.schema``,
``tools[0].function.parameters``); ``responses_error`` renames them as this API's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.server.schemas import (
    ChatCompletionRequest,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ToolDefinition,
    ToolFunction,
    field_refused,
    refusal,
)
from pcrt.runtime.server.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputItem,
    InputMessage,
    ResponsesRequest,
    TextFormat,
)

__all__ = [
    "Translated",
    "chat_request",
    "input_items",
    "responses_error",
    "responses_param",
]

_ITEM_TYPES: dict[str, type[BaseModel]] = {
    "message": InputMessage,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}
_TEXT_PARTS = ("input_text", "output_text")


@dataclass(frozen=True)
class Translated:
    """The chat request to run, and the conversation it holds as input items (what a
    stored response keeps: the instructions aside, which OpenAI does not carry over)."""

    chat: ChatCompletionRequest
    conversation: list[dict[str, Any]]


def chat_request(body: ResponsesRequest, earlier: Sequence[dict[str, Any]] = ()) -> Translated:
    """``body`` as OpenAI's chat request; ``earlier``: the input items of the conversation
    ``previous_response_id`` continues (its input and its output), read before ``input``."""
    items = [*input_items(earlier, "previous_response_id"), *input_items(body.input, "input")]
    messages = _messages(body.instructions, items)
    if not messages:
        raise field_refused("input", "the request has no input: send text or at least one item")
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "tools": _tools(body.tools),
        "tool_choice": _tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text.format if body.text else None),
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "user": body.agent_field(),
        "keep_alive": body.keep_alive,
    }
    try:
        chat = ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:  # nothing above should let one through: still a 400
        raise refusal(exc, "input") from None
    conversation = [item.model_dump(exclude_none=True) for item in items]
    return Translated(chat, conversation)


def input_items(raw: str | Sequence[dict[str, Any]], field: str) -> list[InputItem]:
    """``input`` as typed items: text is one user message; an item of a type pcrt does
    not take is a 400 naming it (``field[i]``)."""
    if isinstance(raw, str):
        return [InputMessage(role="user", content=[{"type": "input_text", "text": raw}])]
    return [_item(entry, f"{field}[{i}]") for i, entry in enumerate(raw)]


def _item(entry: dict[str, Any], where: str) -> InputItem:
    # the SDK's short form of a message ({"role", "content"}) has no type
    kind = entry.get("type", "message" if "role" in entry else None)
    model = _ITEM_TYPES.get(str(kind))
    if model is None:
        raise field_refused(
            f"{where}.type",
            f"input items of type {kind!r} are not supported by this server; it takes "
            f"{', '.join(_ITEM_TYPES)} items",
        )
    try:
        item = model.model_validate({**entry, "type": kind})
    except ValidationError as exc:
        raise refusal(exc, where) from None
    assert isinstance(item, InputMessage | FunctionCallItem | FunctionCallOutputItem)
    # parts pcrt cannot read are refused here, where the item's place is known
    if isinstance(item, InputMessage):
        _text(item.content, f"{where}.content")
    elif isinstance(item, FunctionCallOutputItem):
        _text(item.output, f"{where}.output")
    return item


def _messages(instructions: str | None, items: Sequence[InputItem]) -> list[ChatMessage]:
    """The chat conversation: instructions as the system message, then each item. A turn's
    function calls join the assistant message before them (OpenAI writes text and calls
    of one turn as separate items; a chat turn holds both)."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    for item in items:  # each read already (``_item``): its text parts are text
        if isinstance(item, InputMessage):
            messages.append(ChatMessage(role=item.role, content=_text(item.content, "input")))
        elif isinstance(item, FunctionCallItem):
            messages = _with_call(messages, item)
        else:
            output = _text(item.output, "input")
            messages.append(
                ChatMessage.model_validate(
                    {"role": "tool", "tool_call_id": item.call_id, "content": output}
                )
            )
    return messages


def _with_call(messages: list[ChatMessage], item: FunctionCallItem) -> list[ChatMessage]:
    call = {
        "id": item.call_id,
        "type": "function",
        "function": {"name": item.name, "arguments": item.arguments},
    }
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        earlier = (last.model_extra or {}).get("tool_calls") or []
        joined = {"role": "assistant", "content": last.content, "tool_calls": [*earlier, call]}
        return [*messages[:-1], ChatMessage.model_validate(joined)]
    alone = {"role": "assistant", "content": None, "tool_calls": [call]}
    return [*messages, ChatMessage.model_validate(alone)]


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """Text content, or the text of its parts; any other part is a 400 naming it."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            raise field_refused(
                f"{where}[{j}].type",
                f"content of type {kind!r} is not supported by this server; it reads text "
                f"only ({', '.join(_TEXT_PARTS)})",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise field_refused(f"{where}[{j}].text", "a text part needs its 'text' as a string")
        texts.append(text)
    return "".join(texts)


def _tools(tools: Sequence[dict[str, Any]] | None) -> list[ToolDefinition] | None:
    if tools is None:
        return None
    return [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]


def _tool(tool: dict[str, Any], where: str) -> ToolDefinition:
    kind = tool.get("type")
    if kind != "function":
        raise field_refused(
            f"{where}.type",
            f"tools of type {kind!r} are not supported by this server; it offers the model "
            "function tools, which the client runs",
        )
    try:
        flat = FunctionTool.model_validate(tool)
    except ValidationError as exc:
        raise refusal(exc, where) from None
    function = ToolFunction(
        name=flat.name,
        description=flat.description,
        parameters=flat.parameters,
        strict=flat.strict,
    )
    return ToolDefinition(type="function", function=function)


def _tool_choice(choice: str | dict[str, Any] | None) -> str | NamedToolChoice | None:
    if choice is None or isinstance(choice, str):
        return choice
    name = choice.get("name")
    if choice.get("type") != "function" or not isinstance(name, str):
        raise field_refused(
            "tool_choice",
            f"a tool_choice of type {choice.get('type')!r} is not supported by this server; "
            "send none, auto, required or {'type': 'function', 'name': ...}",
        )
    return NamedToolChoice(type="function", function=NamedFunction(name=name))


def _response_format(fmt: TextFormat | None) -> ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    schema = JsonSchemaFormat.model_validate(
        {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
    )
    return ResponseFormat(type="json_schema", json_schema=schema)


# the chat request's fields, and this API's names for them (first match wins)
_RENAMES = (
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"^messages\b.*"), "input"),
    (re.compile(r"^max_tokens$"), "max_output_tokens"),
)


def responses_param(param: str | None) -> str | None:
    """The Responses request's field behind a chat request's field (an error's param)."""
    if param is None:
        return None
    for pattern, renamed in _RENAMES:
        if pattern.match(param):
            return pattern.sub(renamed, param, count=1)
    return param


def responses_error(exc: InvalidRequest) -> InvalidRequest:
    """``exc`` (raised by the chat path) naming this API's field: its param, and its
    message where the message names the field."""
    old = getattr(exc, "param", None)
    new = responses_param(old)
    if old and new != old:
        exc.param = new
        exc.args = (str(exc).replace(old, str(new), 1),)
    return exc
