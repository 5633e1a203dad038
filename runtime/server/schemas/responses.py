"""Wire types of OpenAI's Responses API (``/v1/responses``), the part pcrt serves."""

from __future__ import annotations
