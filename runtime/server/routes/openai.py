"""The OpenAI-compatible routes: chat and text completions, embeddings, models."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pcrt.runtime.engine import Completion, FinishEvent, GenerateRequest, RequestHandle, TokenEvent
from pcrt.runtime.errors import ContextLengthExceeded, PcrtError
from pcrt.runtime.server.forwarding import forward_if_routed, route_headers
from pcrt.runtime.server.http_errors import status_and_body
from pcrt.runtime.server.pool import LoadedModel
from pcrt.runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
)
from pcrt.runtime.server.services import Accounting, agent_of, services_of

__all__ = ["router"]

router = APIRouter()


def _usage(result: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "cancelled" else (reason or "stop")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await _generate(request, body, "/v1/chat/completions", chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await _generate(request, body, "/v1/completions", chat=False)


async def _generate(request: Request, body: GenerationFields, route: str, *, chat: bool) -> Any:
    services = services_of(request)
    acct = Accounting(services, agent=agent_of(request, body.user), model=body.model, route=route)
    try:
        forwarded = await forward_if_routed(request, body, route, chat, acct)
        if forwarded is not None:
            return forwarded
        lease = services.pool.lease(body.model, body.keep_alive_seconds())
        model = await lease.__aenter__()
    except PcrtError as exc:
        acct.failed(exc)
        raise
    try:
        acct.model = model.name
        handle = _submit(model, body, chat, acct)
    except BaseException as exc:
        await lease.__aexit__(type(exc), exc, exc.__traceback__)
        if isinstance(exc, ContextLengthExceeded):
            exc.param = "messages" if chat else "prompt"
        if isinstance(exc, PcrtError):
            acct.failed(exc)
        raise
    # every peer tried failed first: the answer says so, as a forward's would
    fell_back = route_headers(acct, "local") if acct.fallbacks else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(handle, model, body, chat, include_usage, acct, lease),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **fell_back},
        )
    try:
        result = await _collect(handle, request)
    except PcrtError as exc:
        acct.failed(exc)
        raise
    finally:
        await lease.__aexit__(None, None, None)
    # a client that left is still charged for what was generated until it did
    acct.finished(result or handle.result, 200 if result is not None else 499)
    if result is None:  # the client went away; nobody reads this
        return JSONResponse({}, status_code=499)
    if fell_back:
        return JSONResponse(_response(result, model.name, chat), headers=fell_back)
    return _response(result, model.name, chat)


def _submit(
    model: LoadedModel, body: GenerationFields, chat: bool, acct: Accounting
) -> RequestHandle:
    engine = model.engine
    schema = body.output_schema() if isinstance(body, ChatCompletionRequest) else None
    default_max = engine.context_per_slot if chat else 16  # OpenAI's legacy default is 16
    sampling = body.sampling(default_max, schema)
    if isinstance(body, ChatCompletionRequest):
        request = GenerateRequest(messages=body.messages, sampling=sampling, n=body.n)
    else:
        assert isinstance(body, CompletionRequest)
        request = GenerateRequest(prompt=body.prompt_value(), sampling=sampling, n=body.n)
    tokens = engine.prepare(request)  # every check first: a refused prompt costs no quota
    acct.admit(len(tokens))
    return engine.submit(request, prepared=tokens)


async def _collect(handle: RequestHandle, request: Request) -> Completion | None:
    """Wait for the result; a client that disconnects meanwhile cancels the request."""
    waiter = asyncio.ensure_future(handle.completion())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                handle.cancel()
                # the cancel lands within a decode step; never wait on it without bound
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(waiter, timeout=30)
                return None
    finally:
        if not waiter.done():
            waiter.cancel()


def _response(result: Completion, model: str, chat: bool) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        choices: list[dict[str, Any]] = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": _finish_reason(c.finish_reason),
            }
            for c in result.choices
        ]
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": None,
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
    handle: RequestHandle,
    model: LoadedModel,
    body: GenerationFields,
    chat: bool,
    include_usage: bool,
    acct: Accounting,
    lease: Any,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's exact chunk shape."""
    created = int(time.time())
    base: dict[str, Any] = {
        "id": ("chatcmpl-" if chat else "cmpl-") + handle.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": None,
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {**base, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            data["usage"] = None
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    status = 499  # until the stream ends normally, the client is the one who left
    try:
        if chat:
            for i in range(body.n):
                yield chunk([choice(i, None, None, role=True)])
        try:
            async for event in handle:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield chunk([choice(event.index, event.text, None)])
                elif isinstance(event, FinishEvent):
                    reason = _finish_reason(event.finish_reason)
                    yield chunk([choice(event.index, None if chat else "", reason)])
        except PcrtError as exc:  # the engine failed mid-stream: say so in the stream
            code, payload, _ = status_and_body(exc)
            status = code
            acct.failed(exc)
            yield f"data: {json.dumps(payload)}\n\n"
            return
        result = handle.result
        assert result is not None
        if include_usage:
            yield chunk([], usage=_usage(result))
        yield "data: [DONE]\n\n"
        status = 200
        acct.finished(result, status)
    finally:
        if status == 499:
            handle.cancel()
            acct.finished(handle.result, 499)
        await lease.__aexit__(None, None, None)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    services = services_of(request)
    acct = Accounting(
        services, agent=agent_of(request, body.user), model=body.model, route="/v1/embeddings"
    )
    try:
        async with services.pool.lease(body.model) as model:
            acct.model = model.name
            inputs = body.inputs()
            counts = [len(model.engine.model.tokenize(t, parse_special=False)) for t in inputs]
            acct.admit(sum(counts))
            vectors = await model.engine.embed(inputs)
    except PcrtError as exc:
        if isinstance(exc, ContextLengthExceeded):
            exc.param = "input"
        acct.failed(exc)
        raise
    acct.finished_embeddings(sum(counts))
    encode = _base64_floats if body.encoding_format == "base64" else list
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v)}
            for i, v in enumerate(vectors)
        ],
        "model": model.name,
        "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)},
    }


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's compact form (the SDK's default): little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    services = services_of(request)
    registry = services.pool.registry
    loaded = {m.name for m in services.pool.loaded()}
    data = []
    for entry in registry.entries.values():
        pulled = registry.is_pulled(entry)
        data.append(
            {
                "id": entry.name,
                "object": "model",
                "created": int(registry.path_of(entry).stat().st_mtime) if pulled else 0,
                "owned_by": "pcrt",
                "pcrt": {
                    "aliases": list(entry.aliases),
                    "tags": list(entry.tags),
                    "context": entry.context,
                    "source": str(entry.source),
                    "sha256": entry.sha256,
                    "pulled": pulled,
                    "loaded": entry.name in loaded,
                    "default": entry.name == registry.default,
                },
            }
        )
    return {"object": "list", "data": data}
