"""Embeddings on this node (``/v1/embeddings``): OpenAI's request counted, admitted and
embedded by a model leased from the pool; the vectors as floats or OpenAI's base64."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import Request

from pcrt.runtime.errors import ContextLengthExceeded, PcrtError
from pcrt.runtime.server.schemas import EmbeddingRequest
from pcrt.runtime.server.services import Accounting, Services, agent_of

__all__ = ["EmbeddingsServing"]

ROUTE = "/v1/embeddings"


class EmbeddingsServing:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def create_embedding(self, body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        acct = Accounting(
            self.services, agent=agent_of(request, body.user), model=body.model, route=ROUTE
        )
        try:
            async with self.services.pool.lease(body.model) as model:
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
