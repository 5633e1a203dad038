"""Where pcrt keeps its files.

Everything lives under one home directory so that tests (and users with several
installations) can redirect it with one environment variable:

- ``PCRT_HOME``: the data directory (default: the platform's user data dir for "pcrt");
- ``PCRT_MODELS_DIR``: pulled model files (default: ``$PCRT_HOME/models``); separate so
  that test sessions can share one download of the default model;
- ``PCRT_MODELS_FILE``: the user's models file that adds to or overrides the built-in
  ``models.toml`` (default: ``models.toml`` in the platform's user config dir);
- ``PCRT_LIB_PATH``: more directories of reusable ``/lib`` DAGs, ``os.pathsep``-separated,
  read after ``$PCRT_HOME/lib``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

__all__ = ["Paths"]


@dataclass(frozen=True)
class Paths:
    home: Path
    models_dir: Path
    user_models_file: Path
    lib_path: tuple[Path, ...] = ()  # PCRT_LIB_PATH

    @property
    def db_path(self) -> Path:
        return self.home / "pcrt.db"

    @property
    def daemon_log(self) -> Path:
        """The daemon's log file (``pcrt serve`` writes it, ``pcrt logs`` reads it)."""
        return self.home / "logs" / "daemon.log"

    @property
    def lib_dirs(self) -> tuple[Path, ...]:
        """Where the library of ``/lib`` subgraphs lives (``pcrt.runtime.dag.library``)."""
        return (self.home / "lib", *self.lib_path)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        env = dict(os.environ if environ is None else environ)
        home = Path(env.get("PCRT_HOME") or platformdirs.user_data_dir("pcrt")).expanduser()
        models_dir = Path(env.get("PCRT_MODELS_DIR") or home / "models").expanduser()
        user_file = Path(
            env.get("PCRT_MODELS_FILE")
            or Path(platformdirs.user_config_dir("pcrt")) / "models.toml"
        ).expanduser()
        lib_path = tuple(
            Path(part).expanduser()
            for part in env.get("PCRT_LIB_PATH", "").split(os.pathsep)
            if part
        )
        return cls(home=home, models_dir=models_dir, user_models_file=user_file, lib_path=lib_path)

    def ensure(self) -> Paths:
        self.home.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        return self
