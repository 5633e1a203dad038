"""The ``model`` marker, and the guard that keeps it honest.

A test that loads a real model into llama.cpp is slow (a load, then prompts at a few
hundred tokens per second on this machine's 2 cores) and needs the default model pulled.
Such a test asks for the ``default_model_path`` fixture, in its signature, through a
fixture (``engines``, ``runner``, a module's ``server``) or with
``pytest.mark.usefixtures("default_model_path")``: the fixture pulls the model once per
machine, and ``pytest_collection_modifyitems`` below marks every test that reaches it
``model``. ``pytest -m "not model"`` is then the fast tier.

The guard: while a test that is not marked runs (its set-up and tear-down included, and
any thread it starts), a load of a real model fails it loudly at tear-down. The tiny
synthetic GGUFs of ``tests/tiny_model.py`` load in milliseconds and need no pull: they
are allowed. A model loaded by a subprocess (``pcrt serve``, llama-cpp-python's server)
is beyond the guard; such a test asks for ``default_model_path`` anyway, since the
subprocess needs the model pulled.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Generator
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_bindings
import pytest

__all__ = ["MODEL_FIXTURE", "ModelLoadGuard"]

MODEL_FIXTURE = "default_model_path"
# tests/tiny_model.py writes GGUFs of a few kB; the smallest real model is ~100 MB
TINY_MODEL_BYTES = 1 << 20

_GUARD_KEY = pytest.StashKey["ModelLoadGuard"]()
_LOAD = "llama_model_load_from_file"  # where every model load passes, pcrt's or Llama's


class ModelLoadGuard:
    """Records the real models loaded while an unmarked test runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # loads happen on engine and server threads
        self._unmarked: pytest.Item | None = None
        self._loads: list[str] = []
        self._originals: dict[Any, Callable[..., Any]] = {}

    def install(self) -> None:
        # the package re-exports the binding: pcrt calls the one, Llama the other
        for module in (llama_cpp, llama_cpp_bindings):
            original = getattr(module, _LOAD)
            self._originals[module] = original
            setattr(module, _LOAD, self._wrap(original))

    def uninstall(self) -> None:
        for module, original in self._originals.items():
            setattr(module, _LOAD, original)
        self._originals.clear()

    def _wrap(self, load: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(load)
        def guarded_load(path: bytes, params: Any) -> Any:
            with self._lock:
                if self._unmarked is not None and _is_real_model(path):
                    self._loads.append(os.fsdecode(path))
            return load(path, params)

        return guarded_load

    def watch(self, item: pytest.Item) -> None:
        with self._lock:
            self._unmarked = None if item.get_closest_marker("model") else item
            self._loads = []

    def loads_and_stop(self) -> list[str]:
        with self._lock:
            loads, self._loads, self._unmarked = self._loads, [], None
            return loads


def _is_real_model(path: bytes) -> bool:
    try:
        return os.path.getsize(path) > TINY_MODEL_BYTES
    except OSError:
        return True  # llama.cpp will say what is wrong with it; it was meant as a real one


def pytest_configure(config: pytest.Config) -> None:
    guard = ModelLoadGuard()
    guard.install()
    config.stash[_GUARD_KEY] = guard


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(_GUARD_KEY, None)
    if guard is not None:
        guard.uninstall()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # fixturenames is the whole closure: fixtures of fixtures and usefixtures count
        if MODEL_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.config.stash[_GUARD_KEY].watch(item)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    loads = item.config.stash[_GUARD_KEY].loads_and_stop()
    if loads:
        pytest.fail(
            f"{item.nodeid} loaded {', '.join(sorted(set(loads)))} but is not marked "
            f"'model': ask for the {MODEL_FIXTURE} fixture (tests/model_guard.py)",
            pytrace=False,
        )
    return result
