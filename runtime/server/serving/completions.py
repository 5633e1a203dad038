"""Chat and text completions on this node (``/v1/chat/completions``, ``/v1/completions``).

OpenAI's request becomes a ``GenerateRequest``, checked (``prepare``, in a worker thread:
the chat template, the tokenizer, a JSON schema's grammar can take seconds, and the event
loop waits on none of them), admitted against the agent's limits and submitted to a model
leased from the pool; the answer, or its stream of chunks, leaves in OpenAI's exact shape.
A request the routing policy sends to a peer goes there instead (``forwarding``). The
lease is held by a ``Generation``, which the stream (or the wait for the whole answer)
closes: the route never touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from pcrt.runtime.engine import (
    Completion,
    EngineClient,
    FinishEvent,
    GenerateRequest,
    RequestHandle,
    TokenEvent,
    TokenLogprob,
)
from pcrt.runtime.engine.tool_prompt import tool_messages
from pcrt.runtime.errors import ConstraintInvalid, ContextLengthExceeded, InvalidRequest, PcrtError
from pcrt.runtime.server.forwarding import (
    NativeAnswer,
    NativeRequest,
    NativeStream,
    forward_if_routed,
    route_headers,
)
from pcrt.runtime.server.http_errors import CLIENT_CLOSED_REQUEST, client_left, status_and_body
from pcrt.runtime.server.owned_stream import OwnedStream
from pcrt.runtime.server.pool import LoadedModel, ModelPool
from pcrt.runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    StreamOptions,
)
from pcrt.runtime.server.services import Accounting, Services, agent_of
from pcrt.runtime.server.serving.chat_stream import ChatStream
from pcrt.runtime.server.serving.logprobs import chat_logprobs, completion_logprobs
from pcrt.runtime.server.serving.tool_calls import StreamedReply, ToolPlan, plan_tools
from pcrt.runtime.server.serving.watch import left_before
from pcrt.runtime.sse import encode
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["CompletionsServing", "Generation", "prepare_generation"]

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
_DONE = encode("[DONE]")


class CompletionsServing:
    """OpenAI's completions APIs over the daemon's pool (and its peers)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Any:
        return await self._generate(request, body, CHAT_ROUTE, chat=True)

    async def create_completion(self, body: CompletionRequest, request: Request) -> Any:
        return await self._generate(request, body, COMPLETIONS_ROUTE, chat=False)

    async def chat_stream(
        self, request: Request, body: ChatCompletionRequest, route: str
    ) -> ChatStream:
        """Another API's request, translated into OpenAI's chat ``body``, run as a stream of
        OpenAI chat chunks (here, or on a peer as a chat completion) and billed under that
        API's ``route``: the one engine path behind Ollama's, Anthropic's and Responses'
        surfaces. The caller reads the stream and closes it (``ChatStream.aclose``)."""
        stream = await self.stream_or_native(request, body, route, chat=True)
        assert isinstance(stream, ChatStream)  # nothing native was offered
        return stream

    async def text_stream(
        self, request: Request, body: CompletionRequest, route: str
    ) -> ChatStream:
        """As ``chat_stream``, for a prompt the model reads as it is (Ollama's ``raw``)."""
        stream = await self.stream_or_native(request, body, route, chat=False)
        assert isinstance(stream, ChatStream)  # nothing native was offered
        return stream

    async def stream_or_native(
        self,
        request: Request,
        body: GenerationFields,
        route: str,
        *,
        chat: bool,
        native: NativeRequest | None = None,
    ) -> ChatStream | NativeAnswer | NativeStream:
        """As ``chat_stream`` (``text_stream`` when not ``chat``); with ``native``, a pcrt
        peer chosen for the request is asked it in its own API, and its answer, already in
        the client's shape, comes back to be sent as it is."""
        body = body.model_copy(
            update={"stream": True, "stream_options": StreamOptions(include_usage=True)}
        )
        # what a peer would be asked: only written when there are peers to ask
        peers = self.services.coordinator.enabled
        translated = body.model_dump(mode="json", exclude_none=True, by_alias=True) if peers else {}
        response = await self._generate(
            request, body, route, chat=chat, translated=translated, native=native
        )
        if isinstance(response, NativeAnswer | NativeStream):
            return response
        return ChatStream(response)

    async def _generate(
        self,
        request: Request,
        body: GenerationFields,
        route: str,
        *,
        chat: bool,
        translated: dict[str, Any] | None = None,
        native: NativeRequest | None = None,
    ) -> Any:
        """The answer: a peer's, a stream of chunks, or the whole completion (a dict).
        ``translated``: the OpenAI body of a request another API's route (``route``)
        took in, which a peer is asked as a chat completion."""
        acct = Accounting(
            self.services, agent=agent_of(request, body.user), model=body.model, route=route
        )
        try:
            openai_route = CHAT_ROUTE if chat else COMPLETIONS_ROUTE
            # token ids (Ollama's context) mean something to this model file only: here
            forwarded = None
            if not body.context:
                forwarded = await forward_if_routed(
                    request,
                    body,
                    openai_route if translated is not None else route,
                    chat,
                    acct,
                    translated=translated,
                    native=native,
                )
            if forwarded is not None:
                return forwarded
            generation = await Generation.start(self.services.pool, body, chat, acct)
        except PcrtError as exc:
            acct.failed(exc)
            raise
        # every peer tried failed first: the answer says so, as a forward's would
        fell_back = route_headers(acct, "local") if acct.fallbacks else {}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return OwnedStream(
                _stream(generation, body, chat, include_usage, acct),
                release=lambda: generation.abandon(acct),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **fell_back},
            )
        async with generation:
            try:
                result = await _collect(generation.handle, request)
            except PcrtError as exc:
                acct.failed(exc)
                raise
        # a client that left is still charged for what was generated until it did
        status = 200 if result is not None else CLIENT_CLOSED_REQUEST
        acct.finished(result or generation.handle.result, status)
        if result is None:  # the client went away; nobody reads this
            return client_left()
        logprobs = body.logprobs_asked() is not None
        answer = _response(result, generation.model.name, chat, logprobs, generation.tools)
        return JSONResponse(answer, headers=fell_back) if fell_back else answer


class Generation:
    """A generation running here: the model leased for it and the engine's handle.

    It holds the lease until its owner closes it (``async with``), once: the stream when
    the answer streams (from its first chunk to its end, however it ends), else the wait
    for the whole answer. A stream that never started (its client left first) is
    ``abandon``ed by its response instead."""

    def __init__(
        self,
        model: LoadedModel,
        handle: RequestHandle,
        lease: AsyncExitStack,
        tools: ToolPlan | None = None,
        load_seconds: float = 0.0,
        prompt: list[int] | None = None,
    ) -> None:
        self.model = model
        self.handle = handle
        self.tools = tools  # what the request's tools ask of the reply
        self.load_seconds = load_seconds  # waiting for the model (loading it, if it was not)
        self.prompt = prompt or []  # the prompt's token ids, as the engine reads them
        self._lease = lease
        self._closed = False

    @classmethod
    async def start(
        cls, pool: ModelPool, body: GenerationFields, chat: bool, acct: Accounting
    ) -> Generation:
        """Lease the model and submit the request; a refusal gives the lease back."""
        async with AsyncExitStack() as lease:
            asked = time.perf_counter()
            model = await lease.enter_async_context(
                pool.lease(body.model, body.keep_alive_seconds())
            )
            loading = time.perf_counter() - asked  # a load on first use, else ~0
            acct.model = model.name
            # once per request, never per token: the stream itself stays on the loop
            request, tokens, tools = await to_thread_to_completion(
                prepare_generation, model.engine, body, chat
            )
            acct.admit(len(tokens))  # after every check: a refused prompt costs no quota
            handle = model.engine.submit(request, prepared=tokens)
            return cls(model, handle, lease.pop_all(), tools, loading, tokens)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._closed:
            self._closed = True
            await self._lease.aclose()  # the model's slot goes back to the pool

    async def abandon(self, acct: Accounting) -> None:
        """What a stream does when its client leaves, for one that never ran: the engine
        stops, what it made is billed, the lease goes back. Nothing once closed."""
        if self._closed:
            return
        self.handle.cancel()
        acct.finished(self.handle.result, CLIENT_CLOSED_REQUEST)
        await self.__aexit__()


def prepare_generation(
    engine: EngineClient, body: GenerationFields, chat: bool
) -> tuple[GenerateRequest, list[int], ToolPlan | None]:
    """The engine's request, its checked prompt tokens and its tool plan (in a worker
    thread: the sampling's grammar, the template and the tokenizer all run here)."""
    tools = None
    constrained_calls = False
    try:
        default_max = engine.context_per_slot if chat else 16  # OpenAI's legacy default is 16
        if isinstance(body, ChatCompletionRequest):
            schema = body.output_schema()
            tools = plan_tools(
                body.tools,
                body.tool_choice,
                body.parallel_tool_calls,
                body.messages,
                engine.chat.call_format,
            )
            shaped = schema is not None or body.grammar is not None
            if tools is not None and tools.forced and shaped:
                refused = InvalidRequest(
                    "tool_choice: a forced tool call and response_format (or grammar) cannot "
                    "both shape the reply; send one of them"
                )
                refused.param = "tool_choice"
                raise refused
            # without tools offered, earlier calls are still written the model's way (a
            # template that writes no calls would drop them: the model would not see them)
            fmt, roles = engine.chat.call_format, engine.chat.roles
            messages = (
                tools.messages(body.messages, roles)
                if tools
                else tool_messages(fmt, [], "none", body.messages, roles)
            )
            sampling = body.sampling(default_max, schema)
            # calls are held to their grammar, unless the reply is shaped otherwise
            # (auto beside a response_format: the format wins, and calls only parse)
            if tools is not None and tools.offered and not shaped:
                sampling = tools.constrain(sampling, engine.model.special_token)
                constrained_calls = True
            template_tools = tools.template_tools() if tools else None
            request = GenerateRequest(
                messages=messages, tools=template_tools, sampling=sampling, n=body.n
            )
        else:
            assert isinstance(body, CompletionRequest)
            sampling = body.sampling(default_max, None)
            request = GenerateRequest(prompt=body.prompt_value(), sampling=sampling, n=body.n)
        if body.context:  # Ollama's: an earlier prompt and answer, read first
            request = dataclasses.replace(request, context=tuple(body.context))
        return request, engine.prepare(request), tools
    except ContextLengthExceeded as exc:
        exc.param = "messages" if chat else "prompt"  # the field that holds the text
        raise
    except ConstraintInvalid as exc:  # the field that holds the schema or grammar
        if constrained_calls and tools is not None:
            raise tools.explain(exc) from None
        if exc.source == "grammar":
            exc.param = ".".join(p for p in ("grammar", exc.where) if p)
        else:
            exc.param = ".".join(p for p in ("response_format.json_schema.schema", exc.where) if p)
        raise


async def _collect(handle: RequestHandle, request: Request) -> Completion | None:
    """Wait for the result; a client that disconnects meanwhile cancels the request."""
    waiter = asyncio.ensure_future(handle.completion())
    try:
        if not await left_before(waiter, request):
            return waiter.result()
        handle.cancel()
        # the cancel lands within a decode step; never wait on it without bound
        with contextlib.suppress(Exception):
            await asyncio.wait_for(waiter, timeout=30)
        return None
    finally:
        if not waiter.done():
            waiter.cancel()


def _usage(result: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _timings(result: Completion, generation: Generation) -> dict[str, float]:
    """llama-server's ``timings`` (milliseconds) on the usage chunk, and the model's load
    wait: what Ollama's durations are made of when another API's stream is translated."""
    decode_ms = 1000 * (result.t_done - (result.t_first_token or result.t_done))
    return {
        "prompt_n": result.prompt_tokens - result.cached_tokens,
        "prompt_ms": 1000 * result.prompt_seconds,
        "predicted_n": result.completion_tokens,
        "predicted_ms": decode_ms,
        "load_ms": 1000 * generation.load_seconds,
        "total_ms": 1000 * (result.t_done - result.t_submitted + generation.load_seconds),
    }


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "cancelled" else (reason or "stop")


def _response(
    result: Completion, model: str, chat: bool, logprobs: bool, tools: ToolPlan | None = None
) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        choices: list[dict[str, Any]] = []
        for c in result.choices:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = _finish_reason(c.finish_reason)
            if tools is not None and tools.offered:
                content, calls = tools.answer(c.text)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = [call.wire() for call in calls]
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
                    "finish_reason": finish,
                }
            )
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.logprobs) if logprobs else None,
                "finish_reason": _finish_reason(c.finish_reason),
            }
            for c in result.choices
        ]
        kind, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + result.id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(result),
    }


async def _stream(
    generation: Generation,
    body: GenerationFields,
    chat: bool,
    include_usage: bool,
    acct: Accounting,
) -> AsyncGenerator[str, None]:
    """Server-sent events in OpenAI's exact chunk shape; the stream owns ``generation``
    and closes it when it ends, whether done, failed or cut short by the client."""
    handle = generation.handle
    created = int(time.time())
    base: dict[str, Any] = {
        "id": ("chatcmpl-" if chat else "cmpl-") + handle.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": generation.model.name,
        "system_fingerprint": None,
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {**base, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            data["usage"] = None
        # sse.encode's framing, written out: this runs once per token
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def choice(
        index: int,
        text: str | None,
        finish: str | None,
        role: bool = False,
        logprobs: dict[str, Any] | None = None,
        delta: dict[str, Any] | None = None,
    ) -> dict:
        if chat:
            if delta is None:
                delta = {}
                if role:
                    delta = {"role": "assistant", "content": ""}
                elif text is not None:
                    delta = {"content": text}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    # with tools offered, each choice's text is shaped into content or tool-call deltas
    tools = generation.tools if generation.tools is not None and generation.tools.offered else None
    replies = {i: StreamedReply(tools) for i in range(body.n)} if tools else {}

    # each token's logprob rides with the chunk that carries its text, or a later one when
    # its text is held back (a possible stop string, part of a character)
    wants_logprobs = body.logprobs_asked() is not None
    held: dict[int, list[TokenLogprob]] = {i: [] for i in range(body.n)}
    offsets = dict.fromkeys(range(body.n), 0)  # legacy text_offset: where the next starts

    def logprobs_of(index: int) -> dict[str, Any] | None:
        if not wants_logprobs:
            return None
        entries, held[index] = held[index], []
        if chat:
            return chat_logprobs(entries)
        shape = completion_logprobs(entries, offsets[index])
        offsets[index] += sum(len(t) for t in shape["tokens"])
        return shape

    async with generation:
        status = CLIENT_CLOSED_REQUEST  # until the stream ends normally, the client left
        try:
            if chat:
                for i in range(body.n):
                    yield chunk([choice(i, None, None, role=True)])
            try:
                async for event in handle:
                    if isinstance(event, TokenEvent):
                        if event.logprob is not None:
                            held[event.index].append(event.logprob)
                        if event.text and replies:
                            for delta in replies[event.index].feed(event.text):
                                # the tokens held so far ride with the first delta
                                chosen = logprobs_of(event.index) if held[event.index] else None
                                shaped = choice(
                                    event.index, None, None, logprobs=chosen, delta=delta
                                )
                                yield chunk([shaped])
                        elif event.text:
                            chosen = logprobs_of(event.index)
                            yield chunk([choice(event.index, event.text, None, logprobs=chosen)])
                    elif isinstance(event, FinishEvent):
                        reason = _finish_reason(event.finish_reason)
                        if replies:
                            deltas, reason = replies[event.index].finish(reason)
                            for delta in deltas:
                                yield chunk([choice(event.index, None, None, delta=delta)])
                        rest = logprobs_of(event.index) if held[event.index] else None
                        last = choice(event.index, None if chat else "", reason, logprobs=rest)
                        if event.stop is not None:  # vLLM's extra: the stop string matched
                            last["stop_reason"] = event.stop
                        yield chunk([last])
            except PcrtError as exc:  # the engine failed mid-stream: say so in the stream
                status, payload, _ = status_and_body(exc)
                acct.failed(exc)
                yield encode(json.dumps(payload))
                return
            result = handle.result
            assert result is not None
            if include_usage:
                extra: dict[str, Any] = {"timings": _timings(result, generation)}
                if body.return_tokens:  # Ollama's context: what was read and written
                    extra["tokens"] = [*generation.prompt, *result.choices[0].tokens]
                yield chunk([], usage=_usage(result), **extra)
            yield _DONE
            status = 200
            acct.finished(result, status)
        finally:
            if status == CLIENT_CLOSED_REQUEST:
                handle.cancel()
                acct.finished(handle.result, CLIENT_CLOSED_REQUEST)
