"""OpenAI tool calling over the generic JSON call format (models with no tool template).

A request with ``tools`` becomes a conversation the model can act on and, when a call is
required, an output schema the constrained decoder holds it to:

- the tools are described in a system block, with the one way to call them: a reply that
  is only ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``;
- earlier assistant calls are written back in that same JSON, and ``tool`` messages keep
  their role, so the model reads its own history in the format it writes;
- ``tool_choice`` ``required`` or a named function: the reply must be that JSON, every
  call's ``arguments`` valid against its tool's ``parameters``: one call of a named
  function, or with ``parallel_tool_calls`` false; else up to ``MAX_PARALLEL_CALLS``;
- ``auto``: the model writes freely, and a reply that is that JSON, whole and valid, is
  a call (a lazy constraint that starts at the call marker comes with the model
  families); ``none``: the tools are not shown.

``CallScanner`` reads the calls out of the reply as it streams, so each call's name goes
out as soon as it is written and its arguments in fragments, never as content. Model
families with their own call markup (Hermes, Llama 3, Mistral) come next (issue 18).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.server.schemas import NamedToolChoice, ToolDefinition

__all__ = ["CallScanner", "StreamedReply", "ToolCall", "ToolPlan", "plan_tools"]

CALL_MARKER = '{"tool_calls":['  # how a reply that calls tools starts, whitespace aside
_HEAD = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MAX_PARALLEL_CALLS = 8  # calls in one reply


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text the model wrote, as OpenAI hands it over

    def wire(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's ``tools`` and ``tool_choice`` ask of this reply."""

    tools: tuple[ToolDefinition, ...]
    choice: str  # "none", "auto", "required", or the one function's name
    parallel: bool

    @property
    def forced(self) -> bool:
        """The reply must be calls (constrained from the first token)."""
        return self.choice not in ("none", "auto")

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def output_schema(self) -> dict[str, Any]:
        """The schema of a reply that calls tools: each call one of the allowed tools."""
        allowed = [t for t in self.tools if self._allows(t)]
        variants = [_call_schema(t) for t in allowed]
        one = not self.parallel or self.choice not in ("auto", "required")
        calls: dict[str, Any] = {
            "type": "array",
            "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
            "minItems": 1,
            # a named function is called once; else a bound, or a small model repeats the
            # same call until max_tokens (SmolLM2, greedy: 1,814 tokens of one call)
            "maxItems": 1 if one else MAX_PARALLEL_CALLS,
        }
        return {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }

    def param_of(self, where: str) -> str:
        """The request field behind a place in ``output_schema()`` (a 400 names it):
        ``tools[i].function.parameters...`` for a place inside a tool's arguments."""
        allowed = [i for i, t in enumerate(self.tools) if self._allows(t)]
        found = re.match(
            r"properties\.tool_calls\.items(?:\.anyOf\.(\d+))?\.properties\.arguments\.?(.*)",
            where,
        )
        if found is None:
            return "tools"
        tool = allowed[int(found.group(1) or 0)]
        return ".".join(p for p in (f"tools[{tool}].function.parameters", found.group(2)) if p)

    def _allows(self, tool: ToolDefinition) -> bool:
        return self.choice in ("auto", "required", tool.function.name)

    def messages(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """The conversation as the model reads it: the tools described, calls as JSON."""
        written = [_written(m) for m in messages]
        if not self.offered:
            return written
        block = _tools_block(self.tools, self.choice)
        if written and written[0].role in ("system", "developer"):
            first = written[0]
            return [
                ChatMessage(role=first.role, content=f"{first.text()}\n\n{block}"),
                *written[1:],
            ]
        return [ChatMessage(role="system", content=block), *written]

    def calls_in(self, text: str) -> list[ToolCall] | None:
        """The calls a finished reply makes, or None when it is not a whole, valid call
        reply (with ``auto``: plain content)."""
        scan = CallScanner()
        scan.feed(text)
        if not scan.calls or not all(c.complete for c in scan.calls):
            return None
        try:
            value = json.loads(text)
            jsonschema.validate(value, self.output_schema())
        except (ValueError, jsonschema.ValidationError):
            return None
        return [ToolCall(c.id, c.name or "", c.arguments) for c in scan.calls]


def plan_tools(
    tools: Sequence[ToolDefinition] | None,
    choice: str | NamedToolChoice | None,
    parallel: bool,
    messages: Sequence[ChatMessage],
) -> ToolPlan | None:
    """The request's tool plan (None without tools), every part checked: a 400 names the
    field at fault."""
    _check_history(messages)
    if not tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise _bad("tool_choice", "asks for a tool call, but the request has no tools")
        return None
    names = [t.function.name for t in tools]
    for i, tool in enumerate(tools):
        if names.count(tool.function.name) > 1:
            raise _bad(f"tools[{i}].function.name", f"{tool.function.name!r} is listed twice")
        problem = _schema_problem(tool.function.parameters)
        if problem:
            raise _bad(f"tools[{i}].function.parameters", problem)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise _bad("tool_choice", f"names no tool: {choice.function.name!r}; tools: {names}")
        return ToolPlan(tuple(tools), choice.function.name, parallel)
    return ToolPlan(tuple(tools), choice or "auto", parallel)


# -- reading calls out of a reply as it grows ------------------------------------------


@dataclass
class ScannedCall:
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    name: str | None = None  # once its string is closed
    arguments: str = ""  # the JSON text of its arguments so far
    complete: bool = False


_NAME = re.compile(r'\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class CallScanner:
    """Follows ``{"tool_calls": [{"name": "...", "arguments": {...}}, ...]}`` as it is
    written (the constrained decoder writes exactly that shape, keys in that order)."""

    def __init__(self) -> None:
        self.calls: list[ScannedCall] = []

    def feed(self, text: str) -> None:
        """Read the reply's text so far (the whole of it, each time: replies are short)."""
        head = _HEAD.match(text)
        if head is None:
            return
        i, index = head.end(), 0
        while True:
            brace = text.find("{", i)
            if brace < 0:
                return
            head = _NAME.match(text, brace + 1)
            if head is None:
                return
            if index == len(self.calls):
                self.calls.append(ScannedCall())
            call = self.calls[index]
            call.name = json.loads(f'"{head.group(1)}"')
            end = _value_end(text, head.end())
            call.arguments = text[head.end() : end if end is not None else len(text)]
            call.complete = end is not None
            if end is None:
                return
            i, index = end, index + 1


def may_be_calls(text: str) -> bool:
    """Whether ``text`` is, or may grow into, the start of a call reply."""
    bare = "".join(text.split())
    return CALL_MARKER.startswith(bare) or bare.startswith(CALL_MARKER)


class StreamedReply:
    """One choice's stream when tools are offered: deltas of content, or of tool calls
    (a call's id, type and name first, then its arguments in fragments), never the call
    JSON as content. With ``auto`` a reply that starts like a call is held back until it
    ends, then sent as calls if it is a whole, valid call reply, else as content."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._mode = "calls" if plan.forced else "undecided"  # then "content" or "held"
        self._scan = CallScanner()
        self._sent_args: list[int] = []  # per call: characters of arguments sent

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas this piece of text gives."""
        self.text += text
        if self._mode == "undecided" and not may_be_calls(self.text):
            self._mode = "content"
            return [{"content": self.text}]
        if self._mode == "undecided" and "".join(self.text.split()).startswith(CALL_MARKER):
            self._mode = "held"
        if self._mode == "content":
            return [{"content": text}] if text else []
        if self._mode == "calls":
            return self._call_deltas()
        return []

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the finish reason: ``tool_calls`` for a whole call reply."""
        if self._mode == "content":
            return [], reason
        calls = self.plan.calls_in(self.text)
        if self._mode == "calls":
            deltas = self._call_deltas()
            return deltas, "tool_calls" if calls else reason
        if calls:  # held (or undecided): now known to be calls
            deltas = [_header(i, c.id, c.name) for i, c in enumerate(calls)]
            deltas += [_fragment(i, c.arguments) for i, c in enumerate(calls)]
            return deltas, "tool_calls"
        return ([{"content": self.text}] if self.text else []), reason

    def _call_deltas(self) -> list[dict[str, Any]]:
        self._scan.feed(self.text)
        deltas = []
        for i, call in enumerate(self._scan.calls):
            if i == len(self._sent_args):
                assert call.name is not None  # a scanned call has its name
                deltas.append(_header(i, call.id, call.name))
                self._sent_args.append(0)
            fresh = call.arguments[self._sent_args[i] :]
            if fresh:
                deltas.append(_fragment(i, fresh))
                self._sent_args[i] = len(call.arguments)
        return deltas


def _header(index: int, call_id: str, name: str) -> dict[str, Any]:
    function = {"name": name, "arguments": ""}
    return {
        "tool_calls": [{"index": index, "id": call_id, "type": "function", "function": function}]
    }


def _fragment(index: int, arguments: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON object starting at ``start`` ends (one past its ``}``), or None."""
    depth, in_string, escaped = 0, False, False
    for j in range(start, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


# -- the prompt side ----------------------------------------------------------------------


def _call_schema(tool: ToolDefinition) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or _EMPTY_PARAMETERS,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _tools_block(tools: Sequence[ToolDefinition], choice: str) -> str:
    listed = "\n".join(
        json.dumps(
            {
                "name": t.function.name,
                "description": t.function.description or "",
                "parameters": t.function.parameters or _EMPTY_PARAMETERS,
            },
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


def _written(message: ChatMessage) -> ChatMessage:
    """An assistant's earlier calls as the JSON the model writes, after any text it wrote
    with them (another model's history may have both); other messages as they are."""
    calls = (message.model_extra or {}).get("tool_calls")
    if message.role != "assistant" or not calls:
        return message
    written = [
        {
            "name": c["function"]["name"],
            "arguments": json.loads(c["function"].get("arguments") or "{}"),
        }
        for c in calls
    ]
    content = json.dumps({"tool_calls": written}, ensure_ascii=False)
    text = message.text()
    return ChatMessage(role="assistant", content=f"{text}\n{content}" if text else content)


def _check_history(messages: Sequence[ChatMessage]) -> None:
    """Each ``tool`` message answers a call an earlier assistant message made."""
    made: set[str] = set()
    for i, message in enumerate(messages):
        extra = message.model_extra or {}
        if message.role == "assistant":
            for j, call in enumerate(extra.get("tool_calls") or []):
                try:
                    made.add(str(call["id"]))
                    function = call["function"]
                    str(function["name"])
                    json.loads(function.get("arguments") or "{}")
                except (KeyError, TypeError, ValueError):
                    raise _bad(
                        f"messages[{i}].tool_calls[{j}]",
                        "a call needs an id and a function with a name and JSON arguments",
                    ) from None
        elif message.role == "tool":
            call_id = extra.get("tool_call_id")
            if call_id not in made:
                raise _bad(
                    f"messages[{i}].tool_call_id",
                    f"{call_id!r} answers no call an earlier assistant message made",
                )


def _schema_problem(parameters: dict[str, Any] | None) -> str | None:
    if parameters is None:
        return None
    cls = jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator)
    errors = sorted(cls(cls.META_SCHEMA).iter_errors(parameters), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].path)
        return f"not a JSON schema{' at ' + where if where else ''}: {errors[0].message}"
    if parameters.get("type", "object") != "object":
        return "a tool's parameters must be a JSON schema of type object"
    return None


def _bad(param: str, why: str) -> InvalidRequest:
    error = InvalidRequest(f"{param}: {why}")
    error.param = param
    return error
