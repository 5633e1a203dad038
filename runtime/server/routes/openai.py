"""The OpenAI-compatible routes: chat and text completions, embeddings, models.

Thin: each hands its request to its serving object (``serving/``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pcrt.runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from pcrt.runtime.server.serving import serving_of

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await serving_of(request).completions.create_chat_completion(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await serving_of(request).completions.create_completion(body, request)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    return await serving_of(request).embeddings.create_embedding(body, request)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return serving_of(request).models.list_models()
