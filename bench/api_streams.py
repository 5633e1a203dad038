"""One streamed request through each API the daemon speaks, timed as ``bench.http`` times
the OpenAI route: the stamps of the events that carry text, read as each API's clients
read them (SSE ``data:`` lines with a json.loads each, or Ollama's NDJSON lines).

The four ask for the same conversation (one user message, greedy, the same token bound),
so the model decodes the same tokens whichever API asked: the ratio of their decode rates
is what each translation costs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = ["SURFACES", "Surface", "stream_surface"]


@dataclass(frozen=True)
class Surface:
    name: str
    path: str
    body: Callable[[str, str, int], dict[str, Any]]
    text_of: Callable[[dict[str, Any]], str | None]  # an event's text, if it carries some
    ndjson: bool = False


def _openai_text(event: dict[str, Any]) -> str | None:
    for choice in event.get("choices") or ():
        text = (choice.get("delta") or {}).get("content")
        if text:
            return str(text)
    return None


def _ollama_text(event: dict[str, Any]) -> str | None:
    return (event.get("message") or {}).get("content") or None


def _anthropic_text(event: dict[str, Any]) -> str | None:
    if event.get("type") == "content_block_delta":
        return (event.get("delta") or {}).get("text") or None
    return None


def _responses_text(event: dict[str, Any]) -> str | None:
    if event.get("type") == "response.output_text.delta":
        return event.get("delta") or None
    return None


def _ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


SURFACES = {
    "openai": Surface(
        "openai",
        "/v1/chat/completions",
        lambda model, prompt, n: {
            "model": model,
            "messages": _ask(prompt),
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
        },
        _openai_text,
    ),
    "ollama": Surface(
        "ollama",
        "/api/chat",
        lambda model, prompt, n: {
            "model": model,
            "messages": _ask(prompt),
            "options": {"num_predict": n, "temperature": 0},
        },
        _ollama_text,
        ndjson=True,
    ),
    "anthropic": Surface(
        "anthropic",
        "/v1/messages",
        lambda model, prompt, n: {
            "model": model,
            "messages": _ask(prompt),
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
        },
        _anthropic_text,
    ),
    "responses": Surface(
        "responses",
        "/v1/responses",
        lambda model, prompt, n: {
            "model": model,
            "input": prompt,
            "max_output_tokens": n,
            "temperature": 0,
            "stream": True,
        },
        _responses_text,
    ),
}


async def stream_surface(
    client: aiohttp.ClientSession,
    url: str,
    surface: Surface,
    model: str,
    prompt: str,
    max_tokens: int,
) -> dict[str, Any]:
    """One streamed request: status, its start, and a stamp per event with text."""
    start = time.perf_counter()
    stamps: list[float] = []
    body = surface.body(model, prompt, max_tokens)
    async with client.post(url + surface.path, json=body) as response:
        if response.status != 200:
            await response.read()
            return {"status": response.status, "stamps": [], "start": start}
        async for line in response.content:
            if surface.ndjson:
                if not line.strip():
                    continue
                event = json.loads(line)
            elif line.startswith(b"data: {"):
                event = json.loads(line[6:])
            else:
                continue
            if surface.text_of(event):
                stamps.append(time.perf_counter())
    return {"status": 200, "stamps": stamps, "start": start}
