"""The serving layer: one object per API that turns HTTP requests into work on the
daemon's services and the results into the API's wire shapes (as vLLM's OpenAI server
does). Ollama's, Anthropic's and the Responses API are translations: each turns its
request into OpenAI's chat request and reads the answer as OpenAI's chunks
(``chat_stream.py``), so every API shares one engine path. The routes are thin: they
read the request and call their serving object; the serving objects reach the engines
only through the pool, and raise pcrt's errors for ``http_errors`` to answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from pcrt.runtime.server.services import Services
from pcrt.runtime.server.serving.anthropic import AnthropicServing
from pcrt.runtime.server.serving.completions import CompletionsServing
from pcrt.runtime.server.serving.embeddings import EmbeddingsServing
from pcrt.runtime.server.serving.models import ModelsServing
from pcrt.runtime.server.serving.ollama import OllamaServing
from pcrt.runtime.server.serving.responses import ResponsesServing

__all__ = ["Serving", "serving_of"]


@dataclass(frozen=True)
class Serving:
    """The app's serving objects, built once its services run."""

    completions: CompletionsServing
    embeddings: EmbeddingsServing
    models: ModelsServing
    # the other APIs people's clients speak, each translated onto the completions' path
    ollama: OllamaServing
    anthropic: AnthropicServing
    responses: ResponsesServing

    @classmethod
    def of(cls, services: Services) -> Serving:
        completions = CompletionsServing(services)
        embeddings = EmbeddingsServing(services)
        return cls(
            completions=completions,
            embeddings=embeddings,
            models=ModelsServing(services),
            ollama=OllamaServing(services, completions, embeddings),
            anthropic=AnthropicServing(services, completions),
            responses=ResponsesServing(services, completions),
        )


def serving_of(request: Request) -> Serving:
    """The app's serving objects, which its lifespan put on ``app.state``."""
    serving: Serving = request.app.state.serving
    return serving
