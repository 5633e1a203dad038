"""Anthropic's Messages API (``/v1/messages``) over the one chat path (``chat_stream.py``)."""

from __future__ import annotations

from pcrt.runtime.server.services import Services

__all__ = ["AnthropicServing"]


class AnthropicServing:
    def __init__(self, services: Services) -> None:
        self.services = services
