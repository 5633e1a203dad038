"""OpenAI's Responses API (``/v1/responses``) over the one chat path (``chat_stream.py``).

A request becomes OpenAI's chat request (``responses_input``), after the conversation
its ``previous_response_id`` continues; it runs where chat completions run (here or on a
peer, billed under ``/v1/responses``), and its chunks become the Responses events and
Response object (``responses_output``). A response asked to be stored (``store``, true
by default as on OpenAI) is kept in SQLite (``cache/responses.py``, awaited in a worker
thread) before the client hears it is complete, so a continuation sent at once finds it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from pcrt.cache.responses import StoredResponse
from pcrt.runtime.errors import InvalidRequest, NotFound
from pcrt.runtime.server.http_errors import client_left
from pcrt.runtime.server.schemas.responses import ResponsesRequest
from pcrt.runtime.server.services import Services, agent_of
from pcrt.runtime.server.serving.chat_stream import ChatReply, ChatStream, failure_of
from pcrt.runtime.server.serving.completions import CompletionsServing
from pcrt.runtime.server.serving.responses_input import Translated, chat_request, responses_error
from pcrt.runtime.server.serving.responses_output import ResponseEvents, new_id, response_shell
from pcrt.runtime.sse import encode

__all__ = ["RESPONSES_ROUTE", "ResponsesServing", "reply_chunk"]

log = logging.getLogger(__name__)

RESPONSES_ROUTE = "/v1/responses"  # what usage rows bill these requests under


class ResponsesServing:
    def __init__(self, services: Services, completions: CompletionsServing) -> None:
        self.services = services
        self.completions = completions

    async def create(self, body: ResponsesRequest, request: Request) -> Any:
        """``POST /v1/responses``: the Response, or its stream of events."""
        earlier = await self._continued(body.previous_response_id)
        translated = chat_request(body, earlier)
        events = ResponseEvents(response_shell(body, new_id("resp"), int(time.time())))
        try:
            stream = await self.completions.chat_stream(request, translated.chat, RESPONSES_ROUTE)
        except InvalidRequest as exc:  # named by the chat request's fields: rename them
            raise responses_error(exc) from None
        agent = agent_of(request, body.agent_field())
        keep = translated if body.store else None
        if body.stream:
            return stream.respond(self._streamed(stream, events, keep, agent), "text/event-stream")
        return await self._whole(request, stream, events, keep, agent)

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        """``GET /v1/responses/{id}``: a stored response."""
        stored = await self.services.responses.get(response_id)
        if stored is None:
            raise NotFound(f"no stored response {response_id!r}", param="response_id")
        return stored.response

    async def delete(self, response_id: str) -> dict[str, Any]:
        """``DELETE /v1/responses/{id}``."""
        if not await self.services.responses.delete(response_id):
            raise NotFound(f"no stored response {response_id!r}", param="response_id")
        return {"id": response_id, "object": "response", "deleted": True}  # as OpenAI answers

    async def _continued(self, response_id: str | None) -> list[dict[str, Any]]:
        """The input items of the conversation ``previous_response_id`` continues."""
        if response_id is None:
            return []
        stored = await self.services.responses.get(response_id)
        if stored is None:
            kept = self.services.settings.responses_kept
            refused = InvalidRequest(
                f"previous_response_id: no stored response {response_id!r}: it was created "
                f"with store false, deleted, or is older than the {kept} newest this server "
                "keeps; send the whole conversation as input instead"
            )
            refused.param = "previous_response_id"
            raise refused
        return stored.continued()

    async def _streamed(
        self,
        stream: ChatStream,
        events: ResponseEvents,
        keep: Translated | None,
        agent: str,
    ) -> AsyncGenerator[str, None]:
        """The events as server-sent events (``event:`` lines carry each type)."""
        for event in events.started():
            yield _sse(event)
        async for chunk in stream.chunks():
            failure = failure_of(chunk)
            if failure is not None:
                error = chunk.get("error") or {}
                for event in events.failed(str(failure), error.get("code")):
                    yield _sse(event)
                return
            for event in events.feed(chunk):
                yield _sse(event)
        closing = events.finished()
        await self._store(keep, events.response, agent)  # before the client hears "completed"
        for event in closing:
            yield _sse(event)

    async def _whole(
        self,
        request: Request,
        stream: ChatStream,
        events: ResponseEvents,
        keep: Translated | None,
        agent: str,
    ) -> Any:
        reply = await stream.reply(request)  # a failure mid-way raises: its status answers
        if reply is None:
            return client_left()
        events.feed(reply_chunk(reply))
        events.finished()
        await self._store(keep, events.response, agent)
        return JSONResponse(events.response, headers=stream.headers)

    async def _store(
        self, keep: Translated | None, response: Mapping[str, Any], agent: str
    ) -> None:
        if keep is None:
            return
        stored = StoredResponse(
            id=str(response["id"]),
            agent=agent,
            model=str(response["model"]),
            conversation=keep.conversation,
            response=dict(response),
        )
        try:
            await self.services.responses.put(stored)
        except Exception:  # the answer stands; only its continuation is lost
            log.exception("could not store response %s", stored.id)


def reply_chunk(reply: ChatReply) -> dict[str, Any]:
    """A whole chat answer as one chunk (text, then calls, finish, usage): what
    ``ResponseEvents`` reads, for a request that does not stream."""
    calls = [
        {
            "index": i,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(reply.calls)
    ]
    delta: dict[str, Any] = {"content": reply.text, "tool_calls": calls}
    return {
        "model": reply.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reply.finish_reason}],
        "usage": reply.usage,
    }


def _sse(event: Mapping[str, Any]) -> str:
    return encode(json.dumps(event, ensure_ascii=False), str(event["type"]))
