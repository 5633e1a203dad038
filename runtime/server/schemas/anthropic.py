"""Wire types of Anthropic's Messages API (``/v1/messages``), the part pcrt serves."""

from __future__ import annotations
