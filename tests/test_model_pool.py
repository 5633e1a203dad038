"""The daemon's model pool over real HTTP: a keep-alive runs out on its own, and the
loaded-model limit evicts the least recently used idle model."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.settings import ServerSettings
from tests.conftest import shared_models_dir
from tests.live_server import LiveServer
from tests.upstream import second_model

MODEL = "smollm2-135m"
# one thread: two llama.cpp threads spin at barriers, and with another model process on
# the 2 shared cores a decode step slowed from ms to seconds (measured); one never waits
THREADS = 1


def _ask(h: httpx.Client, model: str, **extra: object) -> None:
    body = {"model": model, "prompt": "Hi", "max_tokens": 2, **extra}
    assert h.post("/v1/completions", json=body).status_code == 200


def _loaded(h: httpx.Client) -> set[str]:
    return {m["name"] for m in h.get("/api/ps").json()["models"]}


def test_a_request_keep_alive_unloads_the_model_when_it_runs_out(
    default_model_path: Path,
) -> None:
    settings = ServerSettings(parallel=1, context=512, n_threads=THREADS, keep_alive="5m")
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=60) as h:
        _ask(h, MODEL, keep_alive="2s")
        answered = time.monotonic()
        (model,) = h.get("/api/ps").json()["models"]
        # still loaded after the request (keep_alive 0 would have unloaded it at once)
        assert model["name"] == MODEL
        assert 0 < model["expires_at"] - time.time() <= 2.0
        while _loaded(h) and time.monotonic() - answered < 8:
            time.sleep(0.05)
        idle = time.monotonic() - answered
        assert _loaded(h) == set()  # the reaper (every 1 s) unloaded it, nobody asked
        assert idle >= 1.9, f"unloaded after {idle:.2f} s, before its keep-alive ran out"
        _ask(h, MODEL)  # the next request loads it again, with the daemon's keep-alive
        (again,) = h.get("/api/ps").json()["models"]
        assert again["expires_at"] - time.time() > 250


def test_the_limit_evicts_the_least_recently_used_idle_model(
    tmp_path: Path, default_model_path: Path
) -> None:
    """Three models, room for two: the one used longest ago goes, not the first loaded."""
    q8 = second_model(default_model_path, shared_models_dir())
    user_file = tmp_path / "models.toml"
    user_file.write_text(
        f'[models.smol-copy]\nsource = "{default_model_path}"\ncontext = 512\n\n'
        f'[models.smol-q8]\nsource = "{q8}"\ncontext = 512\n',
        encoding="utf-8",
    )
    paths = Paths(
        home=tmp_path / "home", models_dir=shared_models_dir(), user_models_file=user_file
    )
    settings = ServerSettings(parallel=1, context=512, n_threads=THREADS, max_loaded_models=2)
    with (
        LiveServer(settings, registry=Registry.load(paths)) as live,
        httpx.Client(base_url=live.url, timeout=60) as h,
    ):
        _ask(h, MODEL)
        _ask(h, "smol-copy")
        assert _loaded(h) == {MODEL, "smol-copy"}
        _ask(h, MODEL)  # now smol-copy is the least recently used, though loaded later
        _ask(h, "smol-q8")
        assert _loaded(h) == {MODEL, "smol-q8"}
        _ask(h, "smol-copy")  # and now MODEL is (used before smol-q8)
        assert _loaded(h) == {"smol-q8", "smol-copy"}
