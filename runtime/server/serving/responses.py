"""OpenAI's Responses API (``/v1/responses``) over the one chat path (``chat_stream.py``)."""

from __future__ import annotations

from pcrt.runtime.server.services import Services

__all__ = ["ResponsesServing"]


class ResponsesServing:
    def __init__(self, services: Services) -> None:
        self.services = services
