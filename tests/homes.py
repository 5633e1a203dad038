"""Where a test's pcrt files live: a home of its own per test or daemon, and the shared
models dir where the real default model is pulled once per machine and reused by every
session (env ``PCRT_TEST_MODELS_DIR``, default ``~/.cache/pcrt-test-models``)."""

from __future__ import annotations

import os
from pathlib import Path

from pcrt.runtime.paths import Paths

__all__ = ["isolated_paths", "shared_models_dir"]


def shared_models_dir() -> Path:
    configured = os.environ.get("PCRT_TEST_MODELS_DIR")
    path = Path(configured) if configured else Path.home() / ".cache" / "pcrt-test-models"
    return path.expanduser()


def isolated_paths(home: Path, models: str = "") -> Paths:
    """A pcrt home at ``home`` (created) over the shared models dir. ``models``: the text
    of its own models.toml, added to the built-in catalogue; empty: none (the developer's
    own models file never applies)."""
    user_file = home / "models.toml"
    paths = Paths(home=home, models_dir=shared_models_dir(), user_models_file=user_file)
    paths.ensure()
    if models:
        user_file.write_text(models, encoding="utf-8")
    return paths
