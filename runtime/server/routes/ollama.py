"""Ollama's native API (``/``, ``/api/...``), on pcrt's own port.

Thin: each route hands its request to ``serving/ollama.py`` (generations, embeddings)
or ``serving/ollama_models.py`` (the model routes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from pcrt.runtime.server.schemas.ollama import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaModelRequest,
    OllamaPullRequest,
)
from pcrt.runtime.server.serving import serving_of
from pcrt.runtime.server.serving.ollama import OLLAMA_VERSION

__all__ = ["router"]

router = APIRouter()


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse, include_in_schema=False)
async def running() -> str:
    """What Ollama's clients probe to see a server is up."""
    return "Ollama is running (pcrt)"


@router.get("/api/version")
@router.head("/api/version", include_in_schema=False)
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    return await serving_of(request).ollama.models.tags()


@router.post("/api/show")
async def show(body: OllamaModelRequest, request: Request) -> dict[str, Any]:
    return await serving_of(request).ollama.models.show(body.target)


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    return await serving_of(request).ollama.models.ps()


@router.post("/api/pull")
async def pull(body: OllamaPullRequest, request: Request) -> Any:
    return await serving_of(request).ollama.models.pull(body.target, body.stream)


@router.delete("/api/delete")
async def delete(body: OllamaModelRequest, request: Request) -> Response:
    await serving_of(request).ollama.models.delete(body.target)
    return Response(status_code=200)


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request) -> Response:
    return await serving_of(request).ollama.chat(body, request)


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request) -> Response:
    return await serving_of(request).ollama.generate(body, request)


@router.post("/api/embed")
async def embed(body: OllamaEmbedRequest, request: Request) -> Any:
    return await serving_of(request).ollama.embed(body, request)


@router.post("/api/embeddings")
async def embeddings(body: OllamaEmbeddingsRequest, request: Request) -> Any:
    return await serving_of(request).ollama.embeddings_legacy(body, request)
