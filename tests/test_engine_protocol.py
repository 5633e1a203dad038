"""The real ``Engine`` is an ``EngineClient``: what code outside the engine room may use.
So is the fake engine the server's tests use (``tests/fakes.py``)."""

from __future__ import annotations

from pathlib import Path

from pcrt.runtime.engine import Engine, EngineClient, EngineConfig, GenerateRequest
from pcrt.runtime.engine.sampling import SamplingParams
from tests.fakes import FakeEngine, Script
from tests.tiny_model import write_tiny_llama


async def test_the_engine_satisfies_the_client_protocol(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    config = EngineConfig(parallel=2, context=64, n_threads=1)
    with Engine(path, model_sha256="test", config=config) as engine:
        client: EngineClient = engine  # checked by the project's mypy run (.ci/run)
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
