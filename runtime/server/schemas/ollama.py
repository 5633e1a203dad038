"""Wire types of Ollama's native API (``/api/...``), the part pcrt serves.

Unknown top-level fields are ignored, as Ollama does. ``options`` keeps what it does not
know (``extra="allow"``) so the answer can say which options were not honoured rather
than drop them unseen. Models may be named ``name`` or ``name:latest``; ``model`` and the
older ``name`` field both name one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "OllamaChatRequest",
    "OllamaEmbedRequest",
    "OllamaEmbeddingsRequest",
    "OllamaGenerateRequest",
    "OllamaMessage",
    "OllamaModelRequest",
    "OllamaOptions",
    "OllamaPullRequest",
    "OllamaToolCall",
]


class OllamaOptions(BaseModel):
    """The sampling options pcrt maps onto its own; any other key is kept (extra) and
    named back as not honoured."""

    model_config = ConfigDict(extra="allow")

    num_predict: int | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    def unknown(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OllamaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    # Ollama's clients send objects; a JSON string (as OpenAI's) is accepted too
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # the tool a "tool" message answers
    tool_call_id: str | None = None
    thinking: str | None = None


class _Generation(BaseModel):
    """What chat and generate share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | float | None = None
    think: bool | Literal["low", "medium", "high"] | None = None


class OllamaChatRequest(_Generation):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    raw: bool = False
    # Ollama's conversation so far as token ids (an earlier answer's ``context``)
    context: list[int] | None = None


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    options: OllamaOptions | None = None
    keep_alive: str | float | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OllamaEmbeddingsRequest(BaseModel):
    """The legacy ``/api/embeddings``: one prompt, one vector."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str = ""
    options: OllamaOptions | None = None
    keep_alive: str | float | None = None


class OllamaModelRequest(BaseModel):
    """A request that names one model: ``model``, or ``name`` as older clients send."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    @model_validator(mode="after")
    def _named(self) -> OllamaModelRequest:
        if not (self.model or self.name):
            raise ValueError('name the model: {"model": NAME}')
        return self

    @property
    def target(self) -> str:
        return str(self.model or self.name)


class OllamaPullRequest(OllamaModelRequest):
    stream: bool = True
    insecure: bool = False
