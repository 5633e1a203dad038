"""One chat generation as OpenAI's chunks, read by another API's serving (Ollama's,
Anthropic's, Responses'): each surface translates its request into OpenAI's chat request,
runs it on the one engine path (``CompletionsServing.chat_stream``: accounting, limits,
the pool, tools, routing to peers) and writes what it reads here in its own shape.

A ``ChatStream`` is the OpenAI stream as parsed chunks, wherever it ran (the local
stream's own events, or a peer's passed through). The surface either translates chunk by
chunk into its own stream (``respond``) or collects the whole answer (``reply``); either
way the stream is closed once, which gives back the model's slot or the peer's
connection. ``ReplyBuilder`` is the answer so far (text, tool calls, finish, usage,
timings), for surfaces whose last event repeats the whole answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from pcrt.runtime.errors import PcrtError, StreamFailed
from pcrt.runtime.server.owned_stream import OwnedStream
from pcrt.runtime.server.serving.watch import left_before
from pcrt.runtime.sse import SseSplitter

__all__ = [
    "ChatReply",
    "ChatStream",
    "Delta",
    "ReplyBuilder",
    "ReplyCall",
    "delta_of",
    "failure_of",
    "fields_named",
]

log = logging.getLogger(__name__)

# an error chunk's code, as the status it was raised with (the chunk carries no status)
_STATUS_OF_CODE = {
    "overloaded": 503,
    "model_unavailable": 503,
    "rate_limit_exceeded": 429,
    "peer_unavailable": 502,
    "context_length_exceeded": 400,
}


@dataclass
class ReplyCall:
    """One tool call of the answer: ``arguments`` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str = ""

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as an object (Ollama's and Anthropic's clients take nothing else).
        Calls made here always parse (their grammar holds them); a peer's unconstrained
        model may write something else: that is logged and answered as no arguments."""
        try:
            parsed = json.loads(self.arguments) if self.arguments.strip() else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
        log.warning("call %s of %s: arguments are not a JSON object", self.id, self.name)
        return {}


@dataclass
class ChatReply:
    """The whole answer of one chat generation (choice 0)."""

    id: str
    model: str
    text: str
    calls: list[ReplyCall]
    finish_reason: str  # OpenAI's: stop, length, tool_calls
    usage: dict[str, Any]
    timings: dict[str, float]
    tokens: list[int] | None = None  # the prompt's and answer's ids, when asked
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason stop)

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        details = self.usage.get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


@dataclass(frozen=True)
class Delta:
    """What one chunk adds to the answer (choice 0): text, tool-call fragments as
    OpenAI's deltas carry them, and the finish when it ends there."""

    text: str
    calls: tuple[Mapping[str, Any], ...]
    finish_reason: str | None
    stop_string: str | None  # vLLM's stop_reason: the stop string that ended it


def delta_of(chunk: Mapping[str, Any]) -> Delta | None:
    """Choice 0's part of a chat chunk (or a text completion's), None when it has none."""
    for choice in chunk.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        text = delta.get("content") or choice.get("text") or ""
        finish = choice.get("finish_reason")
        stop = choice.get("stop_reason")
        return Delta(
            text=str(text),
            calls=tuple(delta.get("tool_calls") or ()),
            finish_reason=str(finish) if finish else None,
            stop_string=stop if isinstance(stop, str) else None,
        )
    return None


@dataclass
class ReplyBuilder:
    """The answer so far, from the chunks fed to it in order."""

    id: str = ""
    model: str = ""
    _pieces: list[str] = field(default_factory=list)  # joined once: += per token is O(n²)
    calls: dict[int, ReplyCall] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tokens: list[int] | None = None  # when the request asked (``return_tokens``)

    def feed(self, chunk: Mapping[str, Any]) -> None:
        self.id = self.id or str(chunk.get("id") or "")
        self.model = self.model or str(chunk.get("model") or "")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        if isinstance(chunk.get("tokens"), list):
            self.tokens = chunk["tokens"]
        delta = delta_of(chunk)
        if delta is None:
            return
        if delta.text:
            self._pieces.append(delta.text)
        for call in delta.calls:
            self._call(call)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if delta.stop_string is not None:
            self.stop_sequence = delta.stop_string

    def _call(self, delta: Mapping[str, Any]) -> None:
        index = delta.get("index")
        if not isinstance(index, int):  # a peer that numbers no calls: one call
            index = 0
        function = delta.get("function") or {}
        call = self.calls.get(index)
        if call is None:
            call = self.calls[index] = ReplyCall(
                id=str(delta.get("id") or f"call_{index}"), name=str(function.get("name") or "")
            )
        elif function.get("name"):
            call.name = str(function["name"])
        call.arguments += str(function.get("arguments") or "")

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def reply(self) -> ChatReply:
        return ChatReply(
            id=self.id,
            model=self.model,
            text=self.text,
            calls=[self.calls[i] for i in sorted(self.calls)],
            finish_reason=self.finish_reason or "stop",
            usage=self.usage,
            timings=self.timings,
            tokens=self.tokens,
            stop_sequence=self.stop_sequence,
        )


Renames = tuple[tuple[re.Pattern[str], str], ...]


@contextmanager
def fields_named(renames: Renames) -> Iterator[None]:
    """pcrt's errors raised within, naming another API's fields: the shared chat path
    checks the translated request, and would name OpenAI's (``response_format`` for
    Ollama's ``format``). Each pattern is replaced in the message and in the param."""
    try:
        yield
    except PcrtError as exc:
        if exc.args:
            exc.args = (_renamed(str(exc.args[0]), renames), *exc.args[1:])
        param = getattr(exc, "param", None)
        if isinstance(param, str):
            exc.param = _renamed(param, renames)  # type: ignore[attr-defined]
        raise


def _renamed(text: str, renames: Renames) -> str:
    for pattern, name in renames:
        text = pattern.sub(name, text)
    return text


def failure_of(chunk: Mapping[str, Any]) -> StreamFailed | None:
    """The error a chunk carries (the engine or a peer failed mid-stream), else None."""
    error = chunk.get("error")
    if not isinstance(error, dict):
        return None
    message = str(error.get("message") or "the generation failed")
    status = _STATUS_OF_CODE.get(str(error.get("code")))
    if status is None:
        status = 400 if error.get("type") == "invalid_request_error" else 500
    return StreamFailed(message, status=status, body=dict(chunk))


class ChatStream:
    """The OpenAI chat stream of one generation, as parsed chunks."""

    def __init__(self, response: OwnedStream) -> None:
        self._response = response
        # where it ran and which peers failed it first: the surface's answer says so too
        self.headers = {k: v for k, v in response.headers.items() if k.startswith("x-pc-")}

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        """Each chunk in order, up to ``[DONE]``; a failure mid-stream is the last one
        (``failure_of`` tells it)."""
        splitter = SseSplitter()
        async for piece in self._response.body_iterator:
            raw = piece.encode() if isinstance(piece, str) else bytes(piece)
            for event in splitter.feed(raw):
                if event.data is None or event.done:
                    continue
                try:
                    chunk = json.loads(event.data)
                except ValueError:
                    continue  # a peer's comment or keep-alive: nothing of the answer
                if isinstance(chunk, dict):
                    yield chunk

    async def reply(self, request: Request) -> ChatReply | None:
        """The whole answer (the stream closed after it); None when the client left first
        (the generation stops). A failure mid-stream raises ``StreamFailed``."""
        builder = ReplyBuilder()

        async def read() -> None:
            async for chunk in self.chunks():
                failure = failure_of(chunk)
                if failure is not None:
                    raise failure
                builder.feed(chunk)

        work = asyncio.ensure_future(read())
        try:
            if await left_before(work, request):
                work.cancel()
                return None
            work.result()
            return builder.reply()
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            await self.aclose()

    def respond(
        self,
        events: AsyncGenerator[Any, None],
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> OwnedStream:
        """A surface's own stream made from this one: closing it closes this."""
        return OwnedStream(  # takes the generation: nothing here may raise before it does
            events,
            release=self.aclose,
            media_type=media_type,
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **self.headers,
                **{k: _latin1(v) for k, v in (headers or {}).items()},
            },
        )

    async def aclose(self) -> None:
        """Stop the generation if it still runs and give back what it holds; idempotent."""
        await self._response.close()


def _latin1(value: str) -> str:
    """A header value as HTTP can carry it (Latin-1), whatever a client put in it."""
    return value.encode("latin-1", "backslashreplace").decode("latin-1")
