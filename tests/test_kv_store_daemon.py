"""The KV chunk store in the daemon, through the OpenAI SDK: two agents taking turns on one
slot each find their system prompt again (the slot alone would have lost it), usage says
so, and ``/metrics``, ``/v1/pcrt/cache`` and ``pcrt cache`` show what was saved; ``pcrt
cache clear`` empties the tiers, with and without a daemon (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pcrt.cli.main import main
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.server.settings import ServerSettings
from tests.conftest import ServerFactory
from tests.live_server import LiveServer

MODEL = "smollm2-135m"


def system(agent: str) -> str:
    rules = [
        f"Rule {i} for {agent}: keep answers about {agent}'s topic {i} short." for i in range(14)
    ]
    return f"You are {agent}.\n" + "\n".join(rules)


def turn(server: LiveServer, agent: str, question: str) -> tuple[int, int]:
    """(prompt tokens, cached tokens) of one greedy turn of ``agent``."""
    reply = server.sdk().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": system(agent)},
            {"role": "user", "content": question},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0


@pytest.fixture
def server(default_model_path: Path, live_server: ServerFactory) -> LiveServer:
    return live_server(ServerSettings(parallel=1, context=1024, n_threads=2))


def test_agents_taking_turns_on_one_slot_find_their_prompts_in_the_store(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cold = [turn(server, agent, "What is rule 2?") for agent in ("Ada", "Bo")]
    assert all(cached < 64 for _, cached in cold)  # at most the template's first tokens
    assert server.services.chunks is not None
    server.services.chunks.flush()
    # Ada's turn comes after Bo's took the only slot: her prompt is in the store
    prompt, cached = turn(server, "Ada", "And rule 4?")
    # every full chunk of it, and of the tail the part her new question shares
    assert 4 * 64 <= (prompt - 2) // 64 * 64 <= cached <= prompt - 2

    with server.http() as http:
        status = http.get("/v1/pcrt/cache").json()
        metrics = http.get("/metrics").text
    assert status["enabled"] and status["models"] == {MODEL: "on: 64-token chunks"}
    store = status["store"]
    assert store["hits"] >= 4 and store["tokens_saved"] >= 256 and store["disk_entries"] >= 8
    assert f"pcrt_kv_prefill_tokens_saved_total {float(store['tokens_saved'])}" in metrics
    assert 'pcrt_kv_chunk_store_bytes{tier="disk"}' in metrics

    monkeypatch.setenv("PCRT_URL", server.url)
    shown = CliRunner().invoke(main, ["cache"])
    assert shown.exit_code == 0, shown.output
    assert "chunks of 64 tokens" in shown.output and "prompt tokens not computed" in shown.output
    assert f"{MODEL}: on: 64-token chunks" in shown.output
    cleared = CliRunner().invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and cleared.output.startswith("cleared "), cleared.output
    assert server.services.chunks.stats().disk_entries == 0


def test_pcrt_cache_without_a_daemon_reads_the_disk_tier(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn(server, "Ada", "What is rule 2?")
    assert server.services.chunks is not None
    server.services.chunks.flush()
    home = server.services.pool.registry.paths.home
    monkeypatch.setenv("PCRT_HOME", str(home))
    monkeypatch.setenv("PCRT_URL", "http://127.0.0.1:9")  # nothing answers there
    shown = CliRunner().invoke(main, ["cache", "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"daemon": false' in shown.output and '"disk_entries": 0' not in shown.output
    cleared = CliRunner().invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "cleared " in cleared.output
    assert not list((home / "chunks").glob("??/*"))


def test_a_chunked_state_downloads_and_exports_whole(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A DAG node's state is kept as chunks; a person who downloads or exports it gets a
    whole state, as before, that imports anywhere."""
    node = {"type": "llm", "prompt": system("Ada"), "temperature": 0, "max_tokens": 8}
    dag = {"dag": "/dynamic/chunked", "nodes": {"a": {**node, "cache": False}}}
    with server.http() as http:
        run = http.post("/v1/dags", json={"dag": dag}).json()
        assert run["status"] == "succeeded", run
        (listed,) = http.get("/v1/states", params={"run_id": run["id"]}).json()["data"]
        assert listed["chunks"] >= 4 and listed["size"] < 2_000_000  # a blob of keys and tail
        body = http.get(f"/v1/states/{listed['id']}").content
    whole = KVState.from_bytes(body)  # whole, hash-checked
    assert len(whole.tokens) == listed["tokens"] and len(body) > 4 * 64 * 23_040

    monkeypatch.setenv("PCRT_HOME", str(server.services.pool.registry.paths.home))
    out = tmp_path / "state.kv"
    exported = CliRunner().invoke(main, ["state", "export", listed["id"], str(out)])
    assert exported.exit_code == 0, exported.output
    assert KVState.from_bytes(out.read_bytes()).tokens == whole.tokens
