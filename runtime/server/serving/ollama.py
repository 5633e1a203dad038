"""Ollama's native API (``/api/...``) over the one chat path (``chat_stream.py``).

Generations (``/api/chat``, ``/api/generate``) are translated into OpenAI's chat (or, for
a ``raw`` prompt, text) request and run where the completions run: the same pool, limits,
usage rows, tools and peers. Their answers stream as Ollama's NDJSON lines, the last one
``done: true`` with Ollama's counts and durations (nanoseconds, measured: the load wait,
the prompt's evaluation and the decoding from the engine's own clock). Options pcrt
cannot honour are named in the ``X-PC-Unhonoured-Options`` header, never dropped unseen.

The model routes (``tags``, ``show``, ``ps``, ``pull``, ``delete``) answer from the
registry, the GGUF's own metadata and the pool, in Ollama's shapes; embeddings go through
the embeddings serving. Errors leave as ``{"error": message}`` (``http_errors``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.server.forwarding import NativeRequest
from pcrt.runtime.server.http_errors import client_left, status_and_body
from pcrt.runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    refusal,
)
from pcrt.runtime.server.schemas.ollama import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaMessage,
    OllamaOptions,
)
from pcrt.runtime.server.services import Services, agent_of
from pcrt.runtime.server.serving.chat_stream import (
    ChatReply,
    ChatStream,
    ReplyBuilder,
    delta_of,
    failure_of,
    fields_named,
)
from pcrt.runtime.server.serving.completions import CompletionsServing
from pcrt.runtime.server.serving.embeddings import EmbeddingsServing
from pcrt.runtime.server.serving.ollama_models import OllamaModels
from pcrt.runtime.server.serving.ollama_wire import line, model_name, now
from pcrt.runtime.server.settings import parse_duration

__all__ = [
    "OLLAMA_VERSION",
    "UNHONOURED_HEADER",
    "OllamaServing",
    "chat_request",
    "generate_request",
    "openai_messages",
    "sampling_fields",
]

# the version of Ollama's API these routes follow (clients gate features on it)
OLLAMA_VERSION = "0.12.6"
UNHONOURED_HEADER = "X-PC-Unhonoured-Options"
NDJSON = "application/x-ndjson"
CHAT_ROUTE = "/api/chat"
GENERATE_ROUTE = "/api/generate"

# the OpenAI fields the shared checks name, as Ollama's request calls them
_FIELD_NAMES = (
    (re.compile(r"response_format\.json_schema\.schema"), "format"),
    (re.compile(r"\bresponse_format\b"), "format"),
    (re.compile(r"\bmax_tokens\b"), "options.num_predict"),
    (re.compile(r"(?<![.\w])(stop|temperature|top_p|top_k|min_p|seed)\b"), r"options.\1"),
    (re.compile(r"(?<![.\w])(repeat_penalty|presence_penalty|frequency_penalty)\b"), r"options.\1"),
)

# options with a pcrt sampling field of the same meaning
_SAMPLING_OPTIONS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def _ns(milliseconds: float | None) -> int:
    return int((milliseconds or 0.0) * 1_000_000)


class OllamaServing:
    def __init__(
        self,
        services: Services,
        completions: CompletionsServing,
        embeddings: EmbeddingsServing,
    ) -> None:
        self.services = services
        self.completions = completions
        self.embeddings = embeddings
        self.models = OllamaModels(services)

    # -- generations ----------------------------------------------------------------

    async def chat(self, body: OllamaChatRequest, request: Request) -> Response:
        started = time.perf_counter()
        if not body.messages:  # Ollama's way to load (or, keep_alive 0, unload) a model
            said = {"message": _said("")}
            return await self._load_or_unload(request, body.model, body.keep_alive, said)
        _refuse_thinking(body.think, body.model)
        with fields_named(_FIELD_NAMES):
            openai, unhonoured = chat_request(body)
            stream = await self.completions.stream_or_native(
                request, openai, CHAT_ROUTE, chat=True, native=self._native(CHAT_ROUTE, body)
            )
        if not isinstance(stream, ChatStream):
            return stream  # a pcrt peer's answer, in Ollama's shape already
        lines = _Lines(body.model, started, chat=True)
        return await self._answer(stream, lines, body.stream, unhonoured, request)

    async def generate(self, body: OllamaGenerateRequest, request: Request) -> Response:
        started = time.perf_counter()
        if not body.prompt and not body.context:
            return await self._load_or_unload(
                request, body.model, body.keep_alive, {"response": ""}
            )
        _refuse_thinking(body.think, body.model)
        for field, why in (
            ("images", "this model reads no images"),
            ("suffix", "fill-in-the-middle is not supported"),
            ("template", "send raw: true with the prompt already in the model's format"),
        ):
            if getattr(body, field):
                raise InvalidRequest(f"{field}: {why}", field)
        with fields_named(_FIELD_NAMES):
            openai, unhonoured = generate_request(body)
            native = self._native(GENERATE_ROUTE, body)
            stream = await self.completions.stream_or_native(
                request, openai, GENERATE_ROUTE, chat=not body.raw, native=native
            )
        if not isinstance(stream, ChatStream):
            return stream  # a pcrt peer's answer, in Ollama's shape already
        lines = _Lines(body.model, started, chat=False)
        return await self._answer(stream, lines, body.stream, unhonoured, request)

    def _native(
        self, path: str, body: OllamaChatRequest | OllamaGenerateRequest
    ) -> NativeRequest | None:
        """The request as a pcrt peer is asked it (Ollama's own), when there are peers."""
        if not self.services.coordinator.enabled:
            return None
        return NativeRequest(
            path=path,
            body=body.model_dump(mode="json", exclude_unset=True),
            stream=body.stream,
            usage_of=_usage_of_line,
            failed=lambda message: line({"error": message}).encode(),
            lines=True,
        )

    async def _answer(
        self,
        stream: ChatStream,
        lines: _Lines,
        streamed: bool,
        unhonoured: list[str],
        request: Request,
    ) -> Response:
        headers = _unhonoured_header(unhonoured)
        if streamed:
            return stream.respond(lines.stream(stream), NDJSON, headers)
        reply = await stream.reply(request)
        if reply is None:
            return client_left()
        return JSONResponse(lines.whole(reply), headers={**stream.headers, **headers})

    async def _load_or_unload(
        self,
        request: Request,
        name: str,
        keep_alive: str | float | None,
        empty: dict[str, Any],
    ) -> JSONResponse:
        """An empty prompt: load the model (keeping it ``keep_alive``), or unload it
        (``keep_alive`` 0: now, or once the generations under way end), as Ollama's
        clients do to warm or free a model."""
        seconds = _keep_alive(keep_alive)
        pool = self.services.pool
        entry = pool.registry.resolve(model_name(name))  # an unknown model is a 404
        self.services.limiter.admit(agent_of(request), 0)  # a load is work: limits hold
        if seconds == 0:  # never cuts a generation under way: it unloads after them
            await pool.unload_when_idle(entry.name)
            reason = "unload"
        else:
            async with pool.lease(entry.name, seconds):
                reason = "load"
        return JSONResponse(
            {"model": name, "created_at": now(), **empty, "done": True, "done_reason": reason}
        )

    # -- embeddings -----------------------------------------------------------------

    async def embed(self, body: OllamaEmbedRequest, request: Request) -> Any:
        started = time.perf_counter()
        inputs = body.inputs()
        if not inputs or not all(inputs):
            raise InvalidRequest("input: give a non-empty text, or a list of them", "input")
        openai = EmbeddingRequest(model=model_name(body.model), input=inputs)
        answer = await self.embeddings.create_embedding(
            openai,
            request,
            route="/api/embed",
            keep_alive=_keep_alive(body.keep_alive),
            truncate=body.truncate,  # Ollama cuts a long input by default
        )
        if not isinstance(answer, dict):
            return answer  # the client left
        vectors = [_shortened(d["embedding"], body.dimensions) for d in answer["data"]]
        found = {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": answer["usage"]["prompt_tokens"],
        }
        # an embedding samples nothing: every option given is one not honoured
        options = sorted(body.options.model_dump(exclude_none=True)) if body.options else []
        return JSONResponse(found, headers=_unhonoured_header(options))

    async def embeddings_legacy(self, body: OllamaEmbeddingsRequest, request: Request) -> Any:
        """``/api/embeddings``: one prompt, one vector (``{"embedding": [...]}``)."""
        if not body.prompt:  # as Ollama answers it
            return {"embedding": []}
        openai = EmbeddingRequest(model=model_name(body.model), input=body.prompt)
        answer = await self.embeddings.create_embedding(
            openai, request, route="/api/embeddings", keep_alive=_keep_alive(body.keep_alive)
        )
        if not isinstance(answer, dict):
            return answer
        return {"embedding": answer["data"][0]["embedding"]}


class _Lines:
    """One generation's answer as Ollama's lines: a line per piece while it streams, then
    the closing line with ``done: true``, the counts and the durations."""

    def __init__(self, model: str, started: float, *, chat: bool) -> None:
        self.model = model
        self.started = started
        self.chat = chat

    def piece(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.chat:
            line["message"] = _said(text, calls)
        else:
            line["response"] = text
        line["done"] = False
        return line

    def last(
        self, reply: ChatReply, text: str = "", calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The closing line; ``text`` and ``calls``: the whole answer, when nothing
        streamed before it."""
        line = self.piece(text, calls)
        timings = reply.timings
        line.update(
            done=True,
            done_reason="length" if reply.finish_reason == "length" else "stop",
            total_duration=int((time.perf_counter() - self.started) * 1e9),
            load_duration=_ns(timings.get("load_ms")),
            prompt_eval_count=reply.prompt_tokens,
            prompt_eval_duration=_ns(timings.get("prompt_ms")),
            eval_count=reply.completion_tokens,
            eval_duration=_ns(timings.get("predicted_ms")),
        )
        if not self.chat and reply.tokens is not None:
            line["context"] = reply.tokens
        return line

    def whole(self, reply: ChatReply) -> dict[str, Any]:
        return self.last(reply, reply.text, _ollama_calls(reply) or None)

    async def stream(self, stream: ChatStream) -> AsyncGenerator[str, None]:
        built = ReplyBuilder()
        async for chunk in stream.chunks():
            failure = failure_of(chunk)
            if failure is not None:  # Ollama's clients read an error line mid-stream
                _, body, _ = status_and_body(failure)
                yield line({"error": body["error"]["message"]})
                return
            built.feed(chunk)
            delta = delta_of(chunk)
            if delta is not None and delta.text:
                yield line(self.piece(delta.text))
        reply = built.reply()
        if reply.calls:  # Ollama sends a reply's calls whole, arguments as objects
            yield line(self.piece("", _ollama_calls(reply)))
        yield line(self.last(reply))


def _usage_of_line(answer: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI-style usage out of Ollama's closing line (or whole answer), else None."""
    if not answer.get("done") or "eval_count" not in answer:
        return None
    return {
        "prompt_tokens": answer.get("prompt_eval_count") or 0,
        "completion_tokens": answer.get("eval_count") or 0,
    }


def _said(text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return message


def _ollama_calls(reply: ChatReply) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id,
            "function": {"index": i, "name": call.name, "arguments": call.parsed_arguments()},
        }
        for i, call in enumerate(reply.calls)
    ]


# -- requests ---------------------------------------------------------------------------


def chat_request(body: OllamaChatRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """Ollama's chat request as OpenAI's, and the options it could not honour."""
    fields, unhonoured = sampling_fields(body.options, body)
    values: dict[str, Any] = {**fields, "messages": openai_messages(body.messages)}
    if body.tools:
        values["tools"] = body.tools
    return _validated(ChatCompletionRequest, values), unhonoured


def generate_request(
    body: OllamaGenerateRequest,
) -> tuple[ChatCompletionRequest | CompletionRequest, list[str]]:
    """Ollama's generate request as OpenAI's (a text completion when ``raw``), and the
    options it could not honour."""
    fields, unhonoured = sampling_fields(body.options, body)
    fields["return_tokens"] = True  # the answer's context
    fields["context"] = body.context
    if body.raw:  # the prompt as it is, no template (Ollama ignores system then)
        return _validated(CompletionRequest, {**fields, "prompt": body.prompt}), unhonoured
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    return _validated(ChatCompletionRequest, {**fields, "messages": messages}), unhonoured


def openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: calls get ids (Ollama's carry none), arguments
    become JSON text, and each tool result names the call it answers (by ``tool_name``
    among the calls not yet answered, else the first of them)."""
    out: list[dict[str, Any]] = []
    waiting: list[tuple[str, str]] = []  # (call id, tool name) not answered yet
    for i, message in enumerate(messages):
        if message.images:
            raise InvalidRequest("this model reads no images", f"messages[{i}].images")
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.role == "assistant" and message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                arguments = call.function.arguments
                text = arguments if isinstance(arguments, str) else json.dumps(arguments)
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": text},
                    }
                )
                waiting.append((call_id, call.function.name))
            entry["tool_calls"] = calls
        elif message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id or _answered(
                waiting, message.tool_name, f"messages[{i}]"
            )
        out.append(entry)
    return out


def _answered(waiting: list[tuple[str, str]], name: str | None, where: str) -> str:
    """The id of the call a tool result answers: the first unanswered call of that tool,
    else the first unanswered call; a result with no call before it is refused."""
    for k, (call_id, tool) in enumerate(waiting):
        if tool == name:
            del waiting[k]
            return call_id
    if waiting:
        return waiting.pop(0)[0]
    raise InvalidRequest(f"{where}: a tool result, but no tool call before it answers", where)


def sampling_fields(
    options: OllamaOptions | None, body: OllamaChatRequest | OllamaGenerateRequest
) -> tuple[dict[str, Any], list[str]]:
    """OpenAI's request fields for Ollama's model, options, format and keep-alive, and
    the options pcrt does not honour (named back to the client)."""
    fields: dict[str, Any] = {"model": model_name(body.model)}
    if body.keep_alive is not None:
        fields["keep_alive"] = body.keep_alive
    unhonoured = []
    if options is not None:
        for name in _SAMPLING_OPTIONS:
            value = getattr(options, name)
            if value is not None:
                fields[name] = value
        if options.stop is not None:
            fields["stop"] = options.stop
        # Ollama's num_predict: -1 (and -2) mean "until the context is full"
        if options.num_predict is not None and options.num_predict >= 0:
            fields["max_tokens"] = options.num_predict
        if options.num_ctx is not None:
            unhonoured.append("num_ctx (contexts are sized per daemon: pcrt serve --context)")
        unhonoured += sorted(options.unknown())
    if body.format == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        schema = {"name": "format", "schema": body.format}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    return fields, unhonoured


def _validated(
    kind: type[ChatCompletionRequest] | type[CompletionRequest], values: dict[str, Any]
) -> Any:
    """The translated request, checked as OpenAI's routes check theirs."""
    try:
        return kind.model_validate(values)
    except ValidationError as exc:
        raise refusal(exc) from None


def _refuse_thinking(think: object, model: str) -> None:
    if think not in (None, False):
        raise InvalidRequest(f'"{model}" does not support thinking', "think")


def _unhonoured_header(options: list[str]) -> dict[str, str]:
    """The header that names the options not honoured: ASCII (a header's bytes are
    Latin-1, and option names are the client's), at most a few hundred characters."""
    if not options:
        return {}
    named = ", ".join(options).encode("ascii", "backslashreplace").decode("ascii")
    return {UNHONOURED_HEADER: named if len(named) <= 400 else named[:397] + "..."}


def _keep_alive(value: str | float | None) -> float | None:
    """Ollama's keep_alive in seconds: "5m", 300, "-1" or a negative number (forever)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc), "keep_alive") from None


def _shortened(vector: list[float], dimensions: int | None) -> list[float]:
    """Ollama's ``dimensions``: the vector's first N values, unit length again."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]
