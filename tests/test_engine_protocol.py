"""The real ``Engine`` is an ``EngineClient``: what code outside the engine room may use.
So is the fake engine the server's tests use (``tests/fakes.py``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from pcrt.runtime.engine import Engine, EngineClient, EngineConfig, GenerateRequest
from pcrt.runtime.engine.sampling import SamplingParams
from tests.fakes import FakeEngine, Script
from tests.tiny_model import write_tiny_llama

# the mypy-checked assignments (the real engine, then the fake), and a control that mypy
# sees real types and not Any
SNIPPET = """\
from pcrt.runtime.engine import Engine, EngineClient

def as_client(engine: Engine) -> EngineClient:
    client: EngineClient = engine
    reveal_type(engine)
    return client

not_a_client: EngineClient = object()

from tests.fakes import FakeEngine
fake_client: EngineClient = FakeEngine()
"""


async def test_the_engine_satisfies_the_client_protocol(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    config = EngineConfig(parallel=2, context=64, n_threads=1)
    with Engine(path, model_sha256="test", config=config) as engine:
        client: EngineClient = engine  # for mypy, once it resolves pcrt (see below)
        assert isinstance(client, EngineClient)  # every member is there at run time
        assert client.model.path == path and client.chat.available is False
        tokens = client.tokenize_request(GenerateRequest(prompt=[1, 2, 3]))
        assert tokens == [1, 2, 3] and client.prepare(GenerateRequest(prompt=tokens)) == tokens
        assert [s.seq_id for s in client.slots()] == [0, 1]
        assert (client.busy_slots, client.queue_depth, client.closed) == (0, 0, False)
        assert await client.clear_cache() == 0
    assert client.closed


async def test_the_fake_engine_answers_from_its_script() -> None:
    """What a fake engine answers: the queued reply (then ``stop``), else its filler up to
    ``max_tokens`` (``length``); the requests are counted as the real engine counts them."""
    script = Script()
    script.enqueue("Hi", " there", "!")
    with FakeEngine(script=script) as engine:
        client: EngineClient = engine
        assert isinstance(client, EngineClient)
        first = await client.generate(GenerateRequest(prompt="Say hi to me"))
        assert (first.text, first.choices[0].finish_reason) == ("Hi there!", "stop")
        assert (first.prompt_tokens, first.completion_tokens) == (4, 3)
        three = SamplingParams(max_tokens=3)
        again = await client.generate(GenerateRequest(prompt="Say hi", sampling=three, n=2))
        assert [c.text for c in again.choices] == ["The quick brown"] * 2
        assert again.choices[0].finish_reason == "length" and again.completion_tokens == 6
        assert (client.busy_slots, client.queue_depth) == (0, 0)
    assert client.closed


def test_mypy_holds_the_engine_to_the_protocol(tmp_path: Path) -> None:
    """mypy itself checks ``client: EngineClient = engine``. The project's mypy run sees
    ``pcrt.*`` imports as missing (the editable install maps them with an import hook
    mypy does not follow), so here the source folders are laid out as the ``pcrt``
    package they install as, with ``tests`` beside them for the fake engine, and mypy
    checks a snippet against them. mypy runs in a process of its own: run in this one,
    it leaves a heap that took this process 6 s to free at exit."""
    pytest.importorskip("mypy")
    root = tmp_path / "src"
    (root / "pcrt").mkdir(parents=True)
    for part in ("runtime", "device", "routing", "cache", "cli"):
        folder = Path(importlib.import_module(f"pcrt.{part}").__path__[0])
        (root / "pcrt" / part).symlink_to(folder, target_is_directory=True)
    (root / "tests").symlink_to(Path(__file__).parent, target_is_directory=True)
    snippet = root / "engine_client_check.py"
    snippet.write_text(SNIPPET)
    mypy = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--python-version=3.11",
            "--ignore-missing-imports",
            "--follow-imports=silent",  # report the snippet, not the modules it reads
            "--explicit-package-bases",
            f"--cache-dir={tmp_path / 'mypy-cache'}",
            str(snippet),
        ],
        capture_output=True,
        text=True,
    )
    out, err = mypy.stdout, mypy.stderr
    lines = [line.removeprefix(str(snippet)) for line in out.splitlines()]
    assert ':5: note: Revealed type is "pcrt.runtime.engine.engine.Engine"' in lines, out + err
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith(":8:"), out + err  # only the control
