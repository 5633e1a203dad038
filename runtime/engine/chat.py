"""Chat messages to a prompt, with the model's own chat template.

The template is the GGUF's ``tokenizer.chat_template`` (or a ``models.toml`` override),
rendered in a Jinja2 sandbox by llama-cpp-python's formatter, which mirrors what
Hugging Face transformers does with the same template.
"""

from __future__ import annotations

from typing import Any, Literal

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from pydantic import BaseModel, ConfigDict

from pcrt.runtime.errors import ChatTemplateMissing, InvalidRequest, ModelLoadError

__all__ = ["ChatMessage", "ChatRenderer"]


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
        self, template: str | None, bos_token: str, eos_token: str, model_name: str
    ) -> None:
        self.model_name = model_name
        try:
            self._formatter = (
                Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
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

    def render(self, messages: list[ChatMessage]) -> str:
        if self._formatter is None:
            raise ChatTemplateMissing(
                f"model {self.model_name!r} has no chat template: set 'chat_template' for it in "
                "models.toml, or send a plain completion prompt instead"
            )
        if not messages:
            raise InvalidRequest("a chat needs at least one message")
        plain = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
        try:
            result = self._formatter(messages=plain)  # type: ignore[arg-type]
        except Exception as exc:  # templates raise their own errors (raise_exception(...))
            raise InvalidRequest(f"the chat template rejected these messages: {exc}") from None
        return result.prompt
