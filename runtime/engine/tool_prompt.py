"""A conversation with tools as the model reads it, for the tool-call format it writes.

A template that writes tools (``CallFormat.native``) takes them as they are, with earlier
calls and ``tool`` results as messages: the template renders them (``ChatRenderer``). A
template that does not (SmolLM2's, and markups no family here writes) gets the generic
format taught: a system block lists the tools and the one way to call them, and earlier
calls are written back in that JSON, after any text the assistant wrote with them, so
the model reads its own history the way it writes. The OpenAI API and DAG agent nodes
both use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pcrt.runtime.engine.call_formats import CallFormat, ToolSpec
from pcrt.runtime.engine.chat import ChatMessage

__all__ = ["template_tools", "tool_messages", "tools_block"]


def tool_messages(
    fmt: CallFormat,
    tools: Sequence[ToolSpec],
    choice: str,
    messages: Sequence[ChatMessage],
    roles: frozenset[str] = frozenset({"system", "tool"}),
) -> list[ChatMessage]:
    """``messages`` as the model reads them with ``tools`` offered (none: not offered,
    and earlier calls still written in the format's way). ``choice``: ``auto``,
    ``required`` or the one tool's name, as the generic block asks it. ``roles``: the
    roles besides user and assistant its template writes (``ChatRenderer.roles``): a
    template without a system role gets the block in the first user message, one without
    a tool role gets results as user messages."""
    if fmt.native:
        return list(messages)
    written = [_written(m, "tool" in roles) for m in messages]
    if not tools:
        return written
    block = tools_block(tools, choice)
    if written and written[0].role in ("system", "developer"):
        first = written[0]
        return [
            ChatMessage(role=first.role, content=f"{first.text()}\n\n{block}"),
            *written[1:],
        ]
    if "system" not in roles and written and written[0].role == "user":
        first = written[0]
        return [ChatMessage(role="user", content=f"{block}\n\n{first.text()}"), *written[1:]]
    return [ChatMessage(role="system", content=block), *written]


def template_tools(fmt: CallFormat, tools: Sequence[ToolSpec]) -> tuple[dict[str, Any], ...] | None:
    """The tools a template that writes them is given, in OpenAI's shape."""
    if not tools or not fmt.native:
        return None
    return tuple(
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.schema},
        }
        for t in tools
    )


def tools_block(tools: Sequence[ToolSpec], choice: str) -> str:
    """The generic format's system block: the tools, and how to call them."""
    listed = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.schema},
            ensure_ascii=False,
        )
        for t in tools
    )
    when = {
        "auto": "When a tool would help, call it; otherwise answer in plain text.",
        "required": "Call one or more of these tools now.",
    }.get(choice, f"Call the tool {choice!r} now.")
    return (
        f"You can call these tools:\n{listed}\n\n{when} To call tools, reply with only this "
        'JSON: {"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}'
    )


def _written(message: ChatMessage, tool_role: bool = True) -> ChatMessage:
    """An assistant's earlier calls as the JSON the model writes, after any text it wrote
    with them (another model's history may have both); a tool's result as a user message
    when the template has no tool role; other messages as they are."""
    extra = message.model_extra or {}
    if message.role == "tool" and not tool_role:
        name = extra.get("name")
        said = f"The tool {name} returned" if name else "The tool returned"
        return ChatMessage(role="user", content=f"{said}: {message.text()}")
    calls = extra.get("tool_calls")
    if message.role != "assistant" or not calls:
        return message
    written = [
        {
            "name": c["function"]["name"],
            "arguments": _arguments(c["function"].get("arguments")),
        }
        for c in calls
    ]
    content = json.dumps({"tool_calls": written}, ensure_ascii=False)
    text = message.text()
    return ChatMessage(role="assistant", content=f"{text}\n{content}" if text else content)


def _arguments(value: Any) -> Any:
    return json.loads(value or "{}") if isinstance(value, str | None) else value
