"""The daemon's model pool over real HTTP: ``/v1/pcrt/ps`` and ``/v1/pcrt/stop``, keep-alive (a
request's own, 0, and one that runs out with nobody asking), and the loaded-model limit,
which evicts the least recently used idle model.

On fake engines (``tests/fakes.py``): the pool loads, keeps and unloads them as it does
real ones, in no time and without model files.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai

from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import ServerFactory

MODEL = "smollm2-135m"


def _ask(h: httpx.Client, model: str, **extra: object) -> None:
    body = {"model": model, "prompt": "Hi", "max_tokens": 2, **extra}
    assert h.post("/v1/completions", json=body).status_code == 200


def _loaded(h: httpx.Client) -> set[str]:
    return {m["name"] for m in h.get("/v1/pcrt/ps").json()["models"]}


def _more_models(folder: Path, *names: str) -> str:
    """models.toml entries for ``names``: files a fake engine never reads."""
    return "".join(
        f'[models.{name}]\nsource = "{folder / name}.gguf"\ncontext = 512\n\n' for name in names
    )


def test_ps_and_stop(live_server: ServerFactory) -> None:
    server = live_server(ServerSettings(parallel=2, context=1024), opener=FakeEngines())
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    with httpx.Client(base_url=server.url, timeout=60) as h:
        models = h.get("/v1/pcrt/ps").json()["models"]
        assert models[0]["name"] == MODEL and models[0]["parallel"] == 2
        assert models[0]["expires_at"] > time.time()
        assert h.post("/v1/pcrt/stop", json={"model": MODEL}).json()["unloaded"] is True
        assert h.get("/v1/pcrt/ps").json()["models"] == []
        assert h.post("/v1/pcrt/stop", json={"model": "nope"}).status_code == 404
    # the next request loads it again
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )


def test_a_request_keep_alive_unloads_the_model_when_it_runs_out(
    live_server: ServerFactory,
) -> None:
    settings = ServerSettings(parallel=1, context=512, keep_alive="5m")
    live = live_server(settings, opener=FakeEngines())
    with httpx.Client(base_url=live.url, timeout=60) as h:
        _ask(h, MODEL, keep_alive="2s")
        answered = time.monotonic()
        (model,) = h.get("/v1/pcrt/ps").json()["models"]
        # still loaded after the request (keep_alive 0 would have unloaded it at once)
        assert model["name"] == MODEL
        assert 0 < model["expires_at"] - time.time() <= 2.0
        while _loaded(h) and time.monotonic() - answered < 8:
            time.sleep(0.05)
        idle = time.monotonic() - answered
        assert _loaded(h) == set()  # the reaper (every 1 s) unloaded it, nobody asked
        assert idle >= 1.9, f"unloaded after {idle:.2f} s, before its keep-alive ran out"
        _ask(h, MODEL)  # the next request loads it again, with the daemon's keep-alive
        (again,) = h.get("/v1/pcrt/ps").json()["models"]
        assert again["expires_at"] - time.time() > 250


def test_keep_alive_zero_unloads_and_the_limit_evicts_lru(
    live_server: ServerFactory, tmp_path: Path
) -> None:
    settings = ServerSettings(parallel=1, context=512, max_loaded_models=1)
    live = live_server(settings, models=_more_models(tmp_path, "smol-copy"), opener=FakeEngines())
    with httpx.Client(base_url=live.url, timeout=60) as h:

        def ask(model: str, **extra: object) -> None:
            body = {"model": model, "prompt": "Hi", "max_tokens": 2, **extra}
            assert h.post("/v1/completions", json=body).status_code == 200

        def loaded() -> list[str]:
            return [m["name"] for m in h.get("/v1/pcrt/ps").json()["models"]]

        ask(MODEL)
        assert loaded() == [MODEL]
        ask("smol-copy")  # the limit is one model: the idle one is evicted
        assert loaded() == ["smol-copy"]
        ask(MODEL, keep_alive=0)
        assert loaded() == []
        ask(MODEL, keep_alive="1h")
        expires = h.get("/v1/pcrt/ps").json()["models"][0]["expires_at"]
        assert 3500 < expires - time.time() <= 3600


def test_the_limit_evicts_the_least_recently_used_idle_model(
    live_server: ServerFactory, tmp_path: Path
) -> None:
    """Three models, room for two: the one used longest ago goes, not the first loaded."""
    settings = ServerSettings(parallel=1, context=512, max_loaded_models=2)
    models = _more_models(tmp_path, "smol-copy", "smol-q8")
    live = live_server(settings, models=models, opener=FakeEngines())
    with httpx.Client(base_url=live.url, timeout=60) as h:
        _ask(h, MODEL)
        _ask(h, "smol-copy")
        assert _loaded(h) == {MODEL, "smol-copy"}
        _ask(h, MODEL)  # now smol-copy is the least recently used, though loaded later
        _ask(h, "smol-q8")
        assert _loaded(h) == {MODEL, "smol-q8"}
        _ask(h, "smol-copy")  # and now MODEL is (used before smol-q8)
        assert _loaded(h) == {"smol-q8", "smol-copy"}
