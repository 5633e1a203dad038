"""OpenAI's Responses API (``/v1/responses``).

Thin: each route hands its request to ``serving/responses.py``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pcrt.runtime.server.schemas.responses import ResponsesRequest
from pcrt.runtime.server.serving import serving_of

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    return await serving_of(request).responses.create(body, request)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> dict[str, Any]:
    return await serving_of(request).responses.retrieve(response_id)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    return await serving_of(request).responses.delete(response_id)
