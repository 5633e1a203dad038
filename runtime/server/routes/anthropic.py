"""Anthropic's Messages API (``/v1/messages``).

Thin: each route hands its request to ``serving/anthropic.py``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pcrt.runtime.server.schemas.anthropic import CountTokensRequest, MessagesRequest
from pcrt.runtime.server.serving import serving_of

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request) -> Any:
    return await serving_of(request).anthropic.create_message(body, request)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    return await serving_of(request).anthropic.count_tokens(body, request)
