"""The real ``Engine`` is an ``EngineClient``: what code outside the engine room may use."""

from __future__ import annotations

from pathlib import Path

from pcrt.runtime.engine import Engine, EngineClient, EngineConfig, GenerateRequest
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
