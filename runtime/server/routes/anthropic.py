"""Anthropic's Messages API (``/v1/messages``).

Thin: each route hands its request to ``serving/anthropic.py``."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
