"""Chat messages to a prompt, with the model's own chat template.

The template is the GGUF's ``tokenizer.chat_template`` (or a ``models.toml`` override),
rendered in a Jinja2 sandbox by llama-cpp-python's formatter, which mirrors what
Hugging Face transformers does with the same template.

Tools reach the template as Hugging Face's templates expect them: ``tools`` in OpenAI's
shape, and each earlier call's ``arguments`` as an object, not OpenAI's JSON string
(templates write it with ``tojson``: a string would be written twice encoded, and
Qwen3-Coder's template fails on it). The template's call format (``call_formats``) is
found once, on first use, by rendering a probe call.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from pydantic import BaseModel, ConfigDict

from pcrt.runtime.engine.call_formats import FORMATS, CallFormat, detect, mistral_id
from pcrt.runtime.errors import ChatTemplateMissing, InvalidRequest, ModelLoadError

__all__ = ["ChatMessage", "ChatRenderer"]

_PROBE = "pcrt-role-probe"


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Content as plain text (OpenAI allows a list of typed parts)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise InvalidRequest(
                    f"content parts of type {part.get('type')!r} are not supported"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRenderer:
    """Renders a conversation for one model; built once per loaded model."""

    def __init__(
        self,
        template: str | None,
        bos_token: str,
        eos_token: str,
        model_name: str,
        call_format: str | None = None,
    ) -> None:
        self.model_name = model_name
        # set in models.toml, or found from the template the first time a tool is offered
        self._call_format = FORMATS[call_format] if call_format else None
        self._roles: frozenset[str] | None = None
        try:
            self._formatter = (
                Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
                if template
                else None
            )
            # the same template, ending after the last message: where a turn ends
            self._closed = (
                Jinja2ChatFormatter(
                    template=template,
                    eos_token=eos_token,
                    bos_token=bos_token,
                    add_generation_prompt=False,
                )
                if template
                else None
            )
        except jinja2.TemplateError as exc:
            raise ModelLoadError(
                f"the chat template of {model_name!r} does not compile: {exc} (fix or set "
                "'chat_template' in models.toml)"
            ) from None
        self.bos_token = bos_token

    @property
    def available(self) -> bool:
        return self._formatter is not None

    @property
    def call_format(self) -> CallFormat:
        """How this model writes tool calls (``call_formats``)."""
        if self._call_format is None:
            if self._formatter is None:
                self._call_format = FORMATS["generic"]
            else:
                formatter = self._formatter
                self._call_format = detect(
                    lambda messages, tools: formatter(messages=messages, tools=tools).prompt  # type: ignore[arg-type]
                )
        return self._call_format

    @property
    def roles(self) -> frozenset[str]:
        """The roles besides user and assistant that the template writes ("system",
        "tool"): found once, by rendering a probe of each (Gemma 2 refuses a system
        message; Phi-3.5 drops tool messages, gpt-oss refuses them)."""
        if self._roles is None:
            probes: dict[str, list[dict[str, Any]]] = {
                "system": [
                    {"role": "system", "content": _PROBE},
                    {"role": "user", "content": "hi"},
                ],
                "tool": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "tool", "content": _PROBE},
                ],
            }
            found = set()
            for role, messages in probes.items():
                try:
                    if self._formatter and _PROBE in self._formatter(messages=messages).prompt:  # type: ignore[arg-type]
                        found.add(role)
                except Exception:  # the template refuses the role
                    pass
            self._roles = frozenset(found)
        return self._roles

    def render(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        *,
        generation_prompt: bool = True,
    ) -> str:
        """The prompt of ``messages`` (and ``tools``), ending with the assistant's turn
        opened, or (``generation_prompt`` false) right after the last message."""
        formatter = self._formatter if generation_prompt else self._closed
        if formatter is None:
            raise ChatTemplateMissing(
                f"model {self.model_name!r} has no chat template: set 'chat_template' for it in "
                "models.toml, or send a plain completion prompt instead"
            )
        if not messages:
            raise InvalidRequest("a chat needs at least one message")
        plain = [self._plain(m) for m in messages]
        if tools is not None:  # templates read every tool's parameters, even when it has none
            tools = [_with_parameters(t) for t in tools]
        try:
            result = formatter(messages=plain, tools=tools)  # type: ignore[arg-type]
        except Exception as exc:  # templates raise their own errors (raise_exception(...))
            raise InvalidRequest(f"the chat template rejected these messages: {exc}") from None
        return result.prompt

    def _plain(self, message: ChatMessage) -> dict[str, Any]:
        """A message as templates read it: text content, calls' arguments as objects, and
        ids as Mistral's templates require them (9 letters or digits) for that family."""
        plain = {**message.model_dump(exclude_none=True), "content": message.text()}
        ids = self.call_format.name.startswith("mistral")
        if "tool_calls" in plain:
            calls = []
            for call in plain["tool_calls"]:
                function = dict(call.get("function") or {})
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    function["arguments"] = json.loads(arguments or "{}")
                call = {**call, "function": function}
                if ids and "id" in call:
                    call["id"] = mistral_id(str(call["id"]))
                calls.append(call)
            plain["tool_calls"] = calls
        if ids and "tool_call_id" in plain:
            plain["tool_call_id"] = mistral_id(str(plain["tool_call_id"]))
        return plain


def _with_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, dict) or function.get("parameters") is not None:
        return tool
    empty = {"type": "object", "properties": {}}
    return {**tool, "function": {**function, "parameters": empty}}
