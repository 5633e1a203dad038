"""Wire types of the OpenAI-compatible API (the subset pcrt serves, plus a few extras).

Unknown fields are ignored, as OpenAI-compatible servers do, so any SDK version works;
fields whose meaning pcrt cannot honour (the legacy ``functions``, ``echo``) are refused
with a clear 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.server.settings import parse_duration

__all__ = [
    "field_refused",
    "refusal",
    "ChatCompletionRequest",
    "NamedToolChoice",
    "ToolDefinition",
    "CompletionRequest",
    "EmbeddingRequest",
    "GenerationFields",
]

MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; llama-server has no bound)
MAX_STOP_CHARS = 1000


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class ToolFunction(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for the name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class GenerationFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    # pcrt and llama.cpp extras
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    grammar: str | None = None
    keep_alive: str | float | None = None
    # Ollama's ``context`` (what /api/generate takes and gives back): token ids read before
    # the prompt, and the prompt's and answer's ids on the stream's usage chunk
    context: list[int] | None = None
    return_tokens: bool = False

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """Every stop string is looked for after every token, on the model's one thread:
        a few short ones, as OpenAI allows."""
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings (got {len(stops)})")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string holds at most {MAX_STOP_CHARS} characters")
        return stop

    def keep_alive_seconds(self) -> float | None:
        if self.keep_alive is None:
            return None
        try:
            return parse_duration(self.keep_alive)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "keep_alive") from None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprob entry lists; None: no logprobs."""
        return None

    def sampling(self, default_max_tokens: int, schema: dict[str, Any] | None) -> SamplingParams:
        values: dict[str, Any] = {
            "max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "stop": self.stops(),
            "json_schema": schema,
            "grammar": self.grammar,
            "logprobs": self.logprobs_asked(),
        }
        for name in (
            "temperature",
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "top_k",
            "min_p",
            "repeat_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if self.logit_bias:
            try:
                values["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise InvalidRequest("logit_bias keys must be token ids") from None
        try:
            return SamplingParams(**values)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.functions:
            raise ValueError("the legacy 'functions' field is not supported: send 'tools'")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_schema(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise InvalidRequest("response_format json_schema needs a 'json_schema.schema'")
        return fmt.json_schema.schema_


class CompletionRequest(GenerationFields):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None
    # the legacy API's: how many alternatives per token (0-5); the prompt's are not given
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        texts = isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str)
        if texts and len(self.prompt) != 1:
            raise ValueError("send one prompt per request (use n for several completions)")
        return self

    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


def field_refused(param: str, why: str) -> InvalidRequest:
    """A 400 about one request field, which its message names first."""
    return InvalidRequest(f"{param}: {why}", param)


def refusal(exc: ValidationError, under: str | None = None) -> InvalidRequest:
    """A translated request pydantic refused (a value another API's shape let through but
    pcrt's checks do not) as a 400 naming the field, found ``under`` a field when given."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in (under, *first.get("loc", ())) if p not in (None, ""))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return field_refused(where, message) if where else InvalidRequest(message)
