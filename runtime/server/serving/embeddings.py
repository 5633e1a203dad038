"""Embeddings on this node (``/v1/embeddings``): OpenAI's request bounded, counted,
admitted and embedded by a model leased from the pool; the vectors as floats or OpenAI's
base64.

A request may hold at most ``max_embedding_inputs`` texts and ``max_embedding_tokens``
tokens in all (settings): more is a 400 before any work. The texts are tokenized in a
worker thread, and the engine embeds them one per step between its decode steps, so a
long request neither stalls the event loop nor the streams running beside it; a client
that leaves stops it after the text under way.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from pcrt.runtime.errors import ContextLengthExceeded, InvalidRequest, PcrtError
from pcrt.runtime.server.http_errors import CLIENT_CLOSED_REQUEST, client_left
from pcrt.runtime.server.schemas import EmbeddingRequest
from pcrt.runtime.server.services import Accounting, Services, agent_of
from pcrt.runtime.server.serving.watch import left_before

__all__ = ["EmbeddingsServing"]

ROUTE = "/v1/embeddings"
T = TypeVar("T")


class EmbeddingsServing:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def create_embedding(
        self,
        body: EmbeddingRequest,
        request: Request,
        *,
        route: str = ROUTE,
        keep_alive: float | None = None,
        truncate: bool = False,
    ) -> Any:
        """OpenAI's answer (a dict), or the response to a client that left. ``route``: the
        route billed (Ollama's embed routes come here too); ``keep_alive``: how long the
        model stays loaded after (None: as it was); ``truncate``: an input over the
        context is cut to it (Ollama's default) rather than refused (OpenAI's)."""
        acct = Accounting(
            self.services, agent=agent_of(request, body.user), model=body.model, route=route
        )
        settings = self.services.settings
        try:
            inputs = body.inputs()
            if len(inputs) > settings.max_embedding_inputs:
                raise InvalidRequest(
                    f"{len(inputs)} inputs; one request embeds at most "
                    f"{settings.max_embedding_inputs} (max_embedding_inputs): split them over "
                    "several requests"
                )
            async with self.services.pool.lease(body.model, keep_alive) as model:
                acct.model = model.name
                prepared = await model.engine.prepare_embeddings(
                    inputs, max_total_tokens=settings.max_embedding_tokens, truncate=truncate
                )
                tokens = sum(map(len, prepared))
                acct.admit(tokens)
                vectors = await _unless_client_leaves(
                    model.engine.embed(inputs, prepared=prepared), request
                )
        except PcrtError as exc:
            if isinstance(exc, ContextLengthExceeded):
                exc.param = "input"
            acct.failed(exc)
            raise
        if vectors is None:  # the client went away; nobody reads this
            acct.finished(None, CLIENT_CLOSED_REQUEST)
            return client_left()
        acct.finished_embeddings(tokens)
        encode = _base64_floats if body.encoding_format == "base64" else list
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(v)}
                for i, v in enumerate(vectors)
            ],
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


async def _unless_client_leaves(work: Awaitable[T], request: Request) -> T | None:
    """``work``'s result, or None once the client has disconnected: the work is then
    cancelled (the engine drops the texts not yet embedded)."""
    task = asyncio.ensure_future(work)
    try:
        return None if await left_before(task, request) else task.result()
    finally:
        task.cancel()  # lands within a loop turn: the engine's job is only a future


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's compact form (the SDK's default): little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
