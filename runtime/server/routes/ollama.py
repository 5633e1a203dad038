"""Ollama's native API (``/api/...``).

Thin: each route hands its request to ``serving/ollama.py``."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
