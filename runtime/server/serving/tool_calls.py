"""OpenAI tool calling in each model family's own call format.

A request with ``tools`` becomes a conversation the model can act on, and a grammar the
constrained decoder holds its calls to (``pcrt.runtime.engine.call_formats``):

- a template that writes tools (Hermes, Qwen, Llama 3, Mistral) gets them, and earlier
  calls and results as messages; one that does not (SmolLM2's) gets a system block
  describing the tools and the generic call JSON, ``{"tool_calls": [...]}``, with earlier
  calls written back in that JSON;
- ``tool_choice`` ``required`` or a named function: the reply is calls from the first
  token, every call's arguments valid against its tool's ``parameters``: one call of a
  named function, or with ``parallel_tool_calls`` false; else up to
  ``MAX_PARALLEL_CALLS``;
- ``auto``: the model writes freely, and the grammar starts where its family's call
  marker does (a lazy constraint), so a call always parses and text is never shaped;
  ``none``: the tools are not shown.

``StreamedReply`` reads the calls out of the reply as it streams, so each call's name
goes out as soon as it is written and its arguments in fragments, never as content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

from pcrt.runtime.engine.call_formats import (
    FORMATS,
    CallFormat,
    ParsedReply,
    ToolSpec,
    call_grammar,
    read_reply,
)
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.constraints import constraint_of, locate_problem
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.tool_prompt import tool_messages
from pcrt.runtime.errors import ConstraintInvalid
from pcrt.runtime.server.schemas import NamedToolChoice, ToolDefinition, field_refused

__all__ = ["StreamedReply", "ToolCall", "ToolPlan", "plan_tools"]

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
    format: CallFormat = FORMATS["generic"]

    @property
    def forced(self) -> bool:
        """The reply must be calls (constrained from the first token)."""
        return self.choice not in ("none", "auto")

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def specs(self) -> list[ToolSpec]:
        """The tools this reply may call."""
        return [
            ToolSpec(t.function.name, t.function.parameters) for t in self.tools if self._allows(t)
        ]

    @property
    def most(self) -> int:
        """Calls one reply may hold: a named function is called once; else a bound, or a
        small model repeats one call until max_tokens (SmolLM2, greedy: 1,814 tokens)."""
        one = not self.parallel or self.choice not in ("auto", "required")
        return 1 if one else MAX_PARALLEL_CALLS

    def grammar(self, special: Callable[[str], int | None]) -> str:
        """The Lark grammar of this reply's calls: from the first token when forced,
        else lazy, from the family's call marker on."""
        return call_grammar(
            self.format, self.specs(), lazy=not self.forced, most=self.most, special=special
        )

    def constrain(
        self, sampling: SamplingParams, special: Callable[[str], int | None]
    ) -> SamplingParams:
        """The request's sampling with its calls' grammar (and, for ``auto``, the
        triggers where that grammar starts)."""
        return sampling.model_copy(
            update={
                "grammar": self.grammar(special),
                "grammar_triggers": () if self.forced else self.format.triggers,
                "anchored_triggers": () if self.forced else self.format.anchored,
                "shown_specials": self.format.markers,
            }
        )

    def output_schema(self) -> dict[str, Any]:
        """The calls as one JSON schema (the generic format's): where a 400 about a
        tool's parameters is located."""
        variants = [_call_schema(t) for t in self.tools if self._allows(t)]
        calls: dict[str, Any] = {
            "type": "array",
            "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
            "minItems": 1,
            "maxItems": self.most,
        }
        return {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }

    def explain(self, error: ConstraintInvalid) -> ConstraintInvalid:
        """llguidance's refusal of the calls' grammar, named in the request's fields."""
        # llguidance names the grammar's line, then quotes the grammar: keep the schema's part
        found = re.search(r"failed to compile JSON schema: (.*?)(?: \d+ \| |$)", error.why)
        located = locate_problem(self.output_schema(), found.group(1) if found else error.why)
        param = self.param_of(located.where)
        # named by the request's field, not by the place inside pcrt's own call schema
        named = ConstraintInvalid("json_schema", param, located.why)
        named.param = param
        return named

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

    def template_tools(self) -> tuple[dict[str, Any], ...] | None:
        """The tools a template that writes them is given, in OpenAI's shape."""
        if not self.offered or not self.format.native:
            return None
        return tuple(t.model_dump(exclude_none=True) for t in self.tools)

    def messages(
        self, messages: Sequence[ChatMessage], roles: frozenset[str] = frozenset({"system", "tool"})
    ) -> list[ChatMessage]:
        """The conversation as the model reads it (``tool_prompt``); ``roles``: those its
        template writes besides user and assistant."""
        shown = [
            ToolSpec(t.function.name, t.function.parameters, t.function.description or "")
            for t in self.tools
        ]
        offered = shown if self.offered else []
        return tool_messages(self.format, offered, self.choice, messages, roles)

    def reply(self, text: str) -> ParsedReply:
        return read_reply(self.format, text, self.specs())

    def answer(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished reply as OpenAI's message: its content (None when the reply is
        only calls) and its whole calls."""
        reply = self.reply(text)
        if not reply.calls:  # no call begun (a marker in prose, unconstrained): all text
            return text, []
        calls = [
            ToolCall(c.call_id or self.format.call_id(), c.name, c.arguments)
            for c in reply.calls
            if c.complete
        ]
        # an unfinished call (cut by max_tokens) is dropped, never shown as markup
        return (reply.content if reply.content.strip() else None), calls


def plan_tools(
    tools: Sequence[ToolDefinition] | None,
    choice: str | NamedToolChoice | None,
    parallel: bool,
    messages: Sequence[ChatMessage],
    call_format: CallFormat = FORMATS["generic"],
) -> ToolPlan | None:
    """The request's tool plan (None without tools), every part checked: a 400 names the
    field at fault."""
    _check_history(messages)
    if not tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise field_refused("tool_choice", "asks for a tool call, but the request has no tools")
        return None
    names = [t.function.name for t in tools]
    for i, tool in enumerate(tools):
        if names.count(tool.function.name) > 1:
            raise field_refused(
                f"tools[{i}].function.name", f"{tool.function.name!r} is listed twice"
            )
        problem = _schema_problem(tool.function.parameters)
        if problem:
            raise field_refused(f"tools[{i}].function.parameters", problem)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise field_refused(
                "tool_choice", f"names no tool: {choice.function.name!r}; tools: {names}"
            )
        return ToolPlan(tuple(tools), choice.function.name, parallel, call_format)
    return ToolPlan(tuple(tools), choice or "auto", parallel, call_format)


# -- a reply as it streams -------------------------------------------------------------


class StreamedReply:
    """One choice's stream when tools are offered: deltas of content, or of tool calls
    (a call's id, type and name first, then its arguments in fragments), never call
    markup as content. Text that may yet begin a call marker is held back until known."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._content_sent = 0  # characters of content sent
        self._ids: list[str] = []  # per call sent: its id
        self._args_sent: list[int] = []  # per call: characters of arguments sent

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas this piece of text gives."""
        self.text += text
        return self._deltas(self.plan.reply(self.text), final=False)

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the finish reason: ``tool_calls`` for whole calls."""
        reply = self.plan.reply(self.text)
        deltas = self._deltas(reply, final=True)
        if not reply.calls and len(self.text) > self._content_sent:
            # a marker in prose that began no call (calls unconstrained): all of it text
            deltas.append({"content": self.text[self._content_sent :]})
            self._content_sent = len(self.text)
        if reason == "stop" and reply.calls and all(c.complete for c in reply.calls):
            reason = "tool_calls"
        return deltas, reason

    def _deltas(self, reply: ParsedReply, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        ready = len(reply.content) - (0 if final or reply.calls else reply.pending)
        if ready > self._content_sent:
            deltas.append({"content": reply.content[self._content_sent : ready]})
            self._content_sent = ready
        for i, call in enumerate(reply.calls):
            if i == len(self._ids):
                self._ids.append(call.call_id or self.plan.format.call_id())
                self._args_sent.append(0)
                deltas.append(_header(i, self._ids[i], call.name))
            fresh = call.arguments[self._args_sent[i] :]
            if fresh:
                deltas.append(_fragment(i, fresh))
                self._args_sent[i] = len(call.arguments)
        return deltas


def _header(index: int, call_id: str, name: str) -> dict[str, Any]:
    function = {"name": name, "arguments": ""}
    return {
        "tool_calls": [{"index": index, "id": call_id, "type": "function", "function": function}]
    }


def _fragment(index: int, arguments: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


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
                    raise field_refused(
                        f"messages[{i}].tool_calls[{j}]",
                        "a call needs an id and a function with a name and JSON arguments",
                    ) from None
        elif message.role == "tool":
            call_id = extra.get("tool_call_id")
            if call_id not in made:
                raise field_refused(
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
    try:  # the bounds every schema the decoder takes is held to (size, depth, $refs)
        constraint_of(parameters, None)
    except ConstraintInvalid as exc:
        return exc.why if not exc.where else f"at {exc.where}: {exc.why}"
    return None
