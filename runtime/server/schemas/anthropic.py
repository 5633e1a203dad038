"""Wire types of Anthropic's Messages API (``/v1/messages``), the part pcrt serves.

Unknown fields are ignored, as the OpenAI types do, so any SDK version works. What
pcrt serves: text, ``tool_use`` and ``tool_result`` blocks, client tools and every
``tool_choice``, stop sequences, temperature, top_p, top_k, ``metadata.user_id`` and
``output_config.format`` (a JSON schema, constrained as OpenAI's ``response_format``).

Refused with a 400 that names them, never silently dropped: content blocks a text model
cannot read (images, documents, search results...) and server tools (web search, code
execution...), whose answer would be missing what the client asked for.

Accepted and ignored, because the answer is right without them: ``cache_control`` on
blocks, tools and the request (pcrt reuses every prompt's cached prefix by itself, with
no breakpoints), ``thinking`` (a permission to think, not content: the reply simply has
no thinking blocks), thinking blocks of earlier turns (Anthropic drops them from the
context itself), ``service_tier``, ``speed``, ``inference_geo``, ``container``,
``output_config.effort``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AnthropicMessage",
    "AnthropicTool",
    "CountTokensRequest",
    "MessagesRequest",
    "TextBlock",
    "ThinkingBlock",
    "ToolChoice",
    "ToolResultBlock",
    "ToolUseBlock",
]

# content blocks Anthropic's API takes that a text model here cannot honour, by type
_UNREADABLE = {
    "image": "images",
    "document": "documents (PDF or text files)",
    "search_result": "search results",
    "container_upload": "container uploads",
    "server_tool_use": "server tool calls",
    "web_search_tool_result": "server tool results",
    "web_fetch_tool_result": "server tool results",
    "code_execution_tool_result": "server tool results",
    "tool_reference": "tool references",
}


# an earlier turn's thinking: accepted and left out, as Anthropic leaves it out itself
_DROPPED = ("thinking", "redacted_thinking")
_READABLE = ("text", "tool_use", "tool_result")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _refuse_unreadable(content: Any) -> Any:
    """A message's content, with a clear refusal of any block pcrt cannot honour (in a
    tool result too), before the union's own errors, which list every variant tried."""
    if not isinstance(content, list):
        return content
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in (*_READABLE, *_DROPPED):
            raise ValueError(f"block {i}: {_refusal(kind, _READABLE)}")
        inner = block.get("content") if kind == "tool_result" else None
        for k, part in enumerate(inner if isinstance(inner, list) else ()):
            part_kind = part.get("type") if isinstance(part, dict) else None
            if part_kind != "text":
                raise ValueError(
                    f"block {i}: its content block {k}: {_refusal(part_kind, ('text',))}"
                )
    return content


def _refusal(kind: Any, allowed: tuple[str, ...]) -> str:
    what = (
        f"{_UNREADABLE[kind]} ({kind!r} blocks) are"
        if isinstance(kind, str) and kind in _UNREADABLE  # a fuzzer's "type" may be anything
        else f"{kind!r} blocks are"
    )
    return f"{what} not supported: pcrt serves text models; send {' or '.join(allowed)} blocks"


class TextBlock(_Wire):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Wire):
    """A call the assistant made, in an earlier turn."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Wire):
    """A call's result, which the user's turn sends back."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n\n".join(block.text for block in self.content)


class ThinkingBlock(_Wire):
    """An earlier turn's thinking: accepted and dropped, as Anthropic drops it."""

    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


class AnthropicMessage(_Wire):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _readable(cls, content: Any) -> Any:
        return _refuse_unreadable(content)

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)


class AnthropicTool(_Wire):
    """A client tool: the caller runs it and sends its result back."""

    # OpenAI's rule for a name (the translated request's), within Anthropic's
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(
                f"server tools ({kind!r}) are not supported: pcrt offers client tools "
                "(name, description, input_schema) whose calls the client runs"
            )
        return data


class ToolChoice(_Wire):
    """``auto``, ``any`` (some tool), ``tool`` (the one ``name``d) or ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("a tool_choice of type 'tool' needs the tool's 'name'")
        return self


class Metadata(_Wire):
    user_id: str | None = None  # whom the request works for: pcrt's agent


class JsonOutputFormat(_Wire):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Wire):
    format: JsonOutputFormat | None = None


class CountTokensRequest(_Wire):
    """What a conversation is, without how to answer it: ``/v1/messages/count_tokens``."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "\n\n".join(block.text for block in self.system) or None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``: the conversation and how to answer it."""

    max_tokens: int = Field(ge=0)  # required, as Anthropic's; 0 warms the prefix cache
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)  # Anthropic's range
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
