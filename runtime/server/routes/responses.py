"""OpenAI's Responses API (``/v1/responses``).

Thin: each route hands its request to ``serving/responses.py``."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
