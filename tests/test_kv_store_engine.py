"""The KV chunk store under a real engine (the default model): a prompt's prefix restored
from chunks instead of computed continues exactly as computed, alone and batched; agents
taking turns find their prefixes; a restart finds yesterday's; a corrupt chunk or another
model's chain is never used (issue 19)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcrt.cache.chunks import ChunkStore
from pcrt.cache.store import Store
from pcrt.runtime.engine import Completion, Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.chunk_cache import COMPUTED_TOKENS, chain_keys, chain_root
from pcrt.runtime.engine.sampling import SamplingParams
from tests.tiny_model import write_tiny_gemma3

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2 Q4_1
CONFIG = EngineConfig(parallel=2, context=1024, n_threads=2)
C = 64


def rules(agent: str, n: int = 12) -> str:
    lines = [f"Rule {i} for {agent}: answer about {agent}'s topic number {i}." for i in range(n)]
    return f"You are {agent}.\n" + "\n".join(lines)


def ask(agent: str, question: str, max_tokens: int = 12) -> GenerateRequest:
    return GenerateRequest(
        messages=[
            ChatMessage(role="system", content=rules(agent)),
            ChatMessage(role="user", content=question),
        ],
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


@pytest.fixture
def home(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    store = Store(tmp_path / "pcrt.db")
    yield store, tmp_path / "chunks"
    store.close()


def chunk_store(home: tuple[Store, Path], ram_bytes: int = 1 << 30) -> ChunkStore:
    return ChunkStore(home[0], home[1], ram_bytes=ram_bytes, disk_bytes=1 << 32)


def open_engine(path: Path, chunks: ChunkStore | None, sha256: str = SHA256) -> Engine:
    return Engine(path, model_sha256=sha256, config=CONFIG, name="smollm2-135m", chunks=chunks)


def full_chunks(result: Completion) -> int:
    """Tokens of the prompt's full chunks a restore gives."""
    return (result.prompt_tokens - COMPUTED_TOKENS) // C * C


def all_but_the_last(result: Completion) -> int:
    """What a restore of a prompt seen before gives: its full chunks and the tail of the
    sequence that ran it, all of it but the last two tokens (``COMPUTED_TOKENS``)."""
    return result.prompt_tokens - COMPUTED_TOKENS


async def test_a_restored_prefix_continues_as_computed_alone_and_batched(
    default_model_path: Path, home: tuple[Store, Path]
) -> None:
    with chunk_store(home) as chunks, open_engine(default_model_path, chunks) as engine:
        assert engine.chunk_status == "on: 64-token chunks"
        computed = [await engine.generate(ask(a, "What is rule 3?")) for a in ("Ada", "Bo")]
        assert all(r.cached_tokens == 0 for r in computed)
        chunks.flush()
        assert await engine.clear_cache() > 0  # the slots forget: only the store holds them
        alone = await engine.generate(ask("Ada", "What is rule 3?"))
        assert alone.cached_tokens == all_but_the_last(alone) and full_chunks(alone) >= 3 * C
        assert alone.choices[0].tokens == computed[0].choices[0].tokens
        await engine.clear_cache()
        batched = await asyncio.gather(
            *(engine.generate(ask(a, "What is rule 3?")) for a in ("Ada", "Bo"))
        )
        for got, want in zip(batched, computed, strict=True):
            assert got.cached_tokens == all_but_the_last(got)
            assert got.choices[0].tokens == want.choices[0].tokens
        stats = chunks.stats()
        assert stats.tokens_saved == sum(r.cached_tokens for r in [alone, *batched])
        # each restore: its full chunks and one tail
        assert stats.hits == sum(full_chunks(r) // C + 1 for r in [alone, *batched])


async def test_eight_agents_taking_turns_on_two_slots_reuse_their_prefixes(
    default_model_path: Path, home: tuple[Store, Path]
) -> None:
    agents = [f"agent-{i}" for i in range(8)]
    with chunk_store(home) as chunks, open_engine(default_model_path, chunks) as engine:
        for question in ("What is rule 1?", "And rule 2?"):
            results = []
            for pair in range(0, 8, 2):  # two at a time, as an agent swarm takes turns
                duo = agents[pair : pair + 2]
                results += await asyncio.gather(*(engine.generate(ask(a, question)) for a in duo))
                chunks.flush()  # spills land in the writer thread's order
            if question.startswith("What"):
                assert all(r.cached_tokens < C for r in results)  # cold: nothing to reuse
            else:  # warm: every agent's system prompt restored, though 2 slots hold 2 of 8
                assert all(r.cached_tokens >= 3 * C for r in results), [
                    r.cached_tokens for r in results
                ]


async def test_a_restart_restores_from_disk(
    default_model_path: Path, home: tuple[Store, Path]
) -> None:
    with chunk_store(home) as chunks, open_engine(default_model_path, chunks) as engine:
        before = await engine.generate(ask("Ada", "What is rule 5?"))
    # a new process: an empty RAM tier, an engine that never saw the prompt
    with chunk_store(home) as chunks, open_engine(default_model_path, chunks) as engine:
        assert chunks.stats().ram_entries == 0 and chunks.stats().disk_entries >= 3
        after = await engine.generate(ask("Ada", "What is rule 5?"))
        assert after.cached_tokens == all_but_the_last(after)
        assert after.choices[0].tokens == before.choices[0].tokens
        assert chunks.stats().hits == full_chunks(after) // C + 1


async def test_a_corrupt_chunk_is_refused_and_the_rest_recomputed(
    default_model_path: Path, home: tuple[Store, Path]
) -> None:
    with chunk_store(home) as chunks, open_engine(default_model_path, chunks) as engine:
        before = await engine.generate(ask("Ada", "What is rule 5?"))
        root = chain_root(engine.compat_key, C)
        keys = chain_keys(root, engine.tokenize_request(ask("Ada", "?")), C)
    bad = home[1] / keys[1][:2] / keys[1]
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    bad.write_bytes(bytes(raw))
    with chunk_store(home) as chunks, open_engine(default_model_path, chunks) as engine:
        after = await engine.generate(ask("Ada", "What is rule 5?"))
        assert after.cached_tokens == C  # the first chunk only: the chain breaks at the bad one
        assert after.choices[0].tokens == before.choices[0].tokens
        assert chunks.stats().refused == 1


async def test_another_models_chain_never_matches(
    default_model_path: Path, home: tuple[Store, Path]
) -> None:
    with chunk_store(home) as chunks:
        with open_engine(default_model_path, chunks) as engine:
            await engine.generate(ask("Ada", "What is rule 5?"))
        chunks.flush()
        held = chunks.stats().disk_entries
        # the same file under another identity: its keys hang from another root
        with open_engine(default_model_path, chunks, sha256="0" * 64) as other:
            result = await other.generate(ask("Ada", "What is rule 5?"))
            assert result.cached_tokens == 0
        assert chunks.stats().hits == 0
        chunks.flush()
        assert chunks.stats().disk_entries == 2 * held  # its own chunks, beside the first's


async def test_a_prefix_only_in_ram_is_restored_without_the_disk(
    default_model_path: Path, home: tuple[Store, Path]
) -> None:
    with (
        ChunkStore(None, None, ram_bytes=1 << 30, disk_bytes=0) as chunks,
        open_engine(default_model_path, chunks) as engine,
    ):
        first = await engine.generate(ask("Ada", "What is rule 7?"))
        chunks.flush()
        await engine.clear_cache()
        again = await engine.generate(ask("Ada", "What is rule 7?"))
        assert again.cached_tokens == all_but_the_last(again)
        assert again.choices[0].tokens == first.choices[0].tokens


async def test_a_sliding_window_model_keeps_whole_states_and_still_resumes(
    tmp_path: Path, home: tuple[Store, Path]
) -> None:
    """Gemma 3's cache (sliding-window layers beside global ones) is not one run of cells
    per token: the self-test says so, the engine keeps whole states, nothing else changes."""
    path = write_tiny_gemma3(tmp_path / "tiny-gemma3.gguf", context=256)
    config = EngineConfig(parallel=2, context=256, n_threads=1)
    with (
        chunk_store(home) as chunks,
        Engine(path, model_sha256="ab" * 32, config=config, name="g3", chunks=chunks) as engine,
    ):
        assert engine.chunk_status.startswith("off: ") and "sliding" in engine.chunk_status
        sampling = SamplingParams(temperature=0.0, max_tokens=4)
        prompt = [i % 15 + 1 for i in range(150)]
        first = await engine.generate(
            GenerateRequest(prompt=prompt, sampling=sampling, export_state=True)
        )
        state = first.choices[0].state
        assert state is not None and state.key.layout.startswith("raw-")
        resumed = await engine.generate(
            GenerateRequest(prompt=[5, 6], sampling=sampling, state=state)
        )
        assert resumed.cached_tokens == len(state.tokens)
        chunks.flush()
        assert chunks.stats().disk_entries == chunks.stats().ram_entries == 0
