"""The model list (``/v1/models``): every configured model in OpenAI's shape, with what
pcrt knows of it (aliases, tags, context, whether it is pulled, loaded, the default)."""

from __future__ import annotations

from typing import Any

from pcrt.runtime.server.services import Services

__all__ = ["ModelsServing"]


class ModelsServing:
    def __init__(self, services: Services) -> None:
        self.services = services

    def list_models(self) -> dict[str, Any]:
        pool = self.services.pool
        registry = pool.registry
        loaded = {m.name for m in pool.loaded()}
        data = []
        for entry in registry.entries.values():
            pulled = registry.is_pulled(entry)
            data.append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": int(registry.path_of(entry).stat().st_mtime) if pulled else 0,
                    "owned_by": "pcrt",
                    "pcrt": {
                        "aliases": list(entry.aliases),
                        "tags": list(entry.tags),
                        "context": entry.context,
                        "source": str(entry.source),
                        "sha256": entry.sha256,
                        "pulled": pulled,
                        "loaded": entry.name in loaded,
                        "default": entry.name == registry.default,
                    },
                }
            )
        return {"object": "list", "data": data}
