"""Wire types of Ollama's native API (``/api/...``), the part pcrt serves."""

from __future__ import annotations
