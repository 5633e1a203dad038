"""The serving layer: one object per API that turns HTTP requests into work on the
daemon's services and the results into the API's wire shapes (as vLLM's OpenAI server
does). The routes are thin: they read the request and call their serving object; the
serving objects reach the engines only through the pool, and raise pcrt's errors for
``http_errors`` to answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from pcrt.runtime.server.services import Services
from pcrt.runtime.server.serving.completions import CompletionsServing
from pcrt.runtime.server.serving.embeddings import EmbeddingsServing
from pcrt.runtime.server.serving.models import ModelsServing

__all__ = ["Serving", "serving_of"]


@dataclass(frozen=True)
class Serving:
    """The app's serving objects, built once its services run."""

    completions: CompletionsServing
    embeddings: EmbeddingsServing
    models: ModelsServing

    @classmethod
    def of(cls, services: Services) -> Serving:
        return cls(
            completions=CompletionsServing(services),
            embeddings=EmbeddingsServing(services),
            models=ModelsServing(services),
        )


def serving_of(request: Request) -> Serving:
    """The app's serving objects, which its lifespan put on ``app.state``."""
    serving: Serving = request.app.state.serving
    return serving
