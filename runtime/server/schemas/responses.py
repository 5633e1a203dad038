"""Wire types of OpenAI's Responses API (``/v1/responses``), the part pcrt serves.

The request's loose parts (``input`` items, ``tools``, ``tool_choice``) are kept as plain
JSON here and read one by one by ``serving/responses_input.py``: an item or a tool of a
type pcrt cannot honour (an image, reasoning, a built-in tool like web_search) is then a
400 that names it and its place, rather than a union's wall of validation errors. Unknown
request fields are ignored, as OpenAI-compatible servers do; fields pcrt cannot honour
(``background``, ``conversation``, ``prompt``) are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "FunctionTool",
    "InputMessage",
    "ResponsesRequest",
    "TextConfig",
    "TextFormat",
]

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class FunctionTool(BaseModel):
    """A function tool in the Responses API's flat shape (Chat Completions nests it)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for the name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class InputMessage(BaseModel):
    """A message item; ``content`` is text or typed parts (``input_text``,
    ``output_text``: the text ones are the only ones pcrt reads)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallItem(BaseModel):
    """A call the model made (an earlier response's output, sent back)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(BaseModel):
    """What the client's function returned for ``call_id``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]
    id: str | None = None
    status: ItemStatus | None = None


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem


class TextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON held to a schema (flat, where
    Chat Completions nests it under ``json_schema``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and not self.schema_:
            raise ValueError("a json_schema format needs its 'schema'")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    # OpenAI refuses fewer than 16
    max_output_tokens: int | None = Field(default=None, ge=16)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's successor of ``user``
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    # what pcrt cannot honour: refused, never ignored
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    # pcrt's extra, as on the chat completions API
    keep_alive: str | float | None = None

    # named by their own field (a model validator's 400 would name none)
    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported: send background false")
        return value

    @field_validator("conversation")
    @classmethod
    def _no_conversation(cls, value: object) -> object:
        if value is not None:
            raise ValueError("conversations are not supported: continue with previous_response_id")
        return value

    @field_validator("prompt")
    @classmethod
    def _no_prompt(cls, value: object) -> object:
        if value is not None:
            raise ValueError("stored prompt templates are not supported: send input")
        return value

    def agent_field(self) -> str | None:
        """Whom the request says it works for (the X-PC-Agent-ID header wins over it)."""
        return self.safety_identifier or self.user
