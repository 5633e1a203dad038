"""A real sequence state (the default model, flash attention off and on) cut into runs of
cells and joined back byte for byte; a prefix cut restored continues exactly as a prompt
of those tokens computed from scratch; what the splitter does not understand is refused
(issue 19's first step)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pcrt.runtime.engine import Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.kv_chunks import KvLayoutError, join, parse
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2 Q4_1
PROMPT = "Write a long story about a lighthouse keeper and the storms of one winter. " * 14


@pytest.fixture(scope="module", params=[False, True], ids=["v-transposed", "flash-attn"])
def engine(default_model_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    config = EngineConfig(parallel=2, context=1024, n_threads=2, flash_attn=request.param)
    eng = Engine(default_model_path, model_sha256=SHA256, config=config, name="smollm2-135m")
    yield eng
    eng.close()


async def _state(engine: Engine) -> KVState:
    sampling = SamplingParams(temperature=0.0, max_tokens=8)
    request = GenerateRequest(prompt=PROMPT, sampling=sampling, export_state=True)
    result = await engine.generate(request)
    state = result.choices[0].state
    assert state is not None
    return state


async def test_a_state_cut_into_chunks_joins_back_byte_for_byte(engine: Engine) -> None:
    state = await _state(engine)
    section = parse(state.payload)
    assert section.n_tokens == len(state.tokens) > 128
    assert section.cut(0, section.n_tokens) == bytes(state.payload)
    bounds = list(range(0, section.n_tokens, 64)) + [section.n_tokens]
    chunks = [parse(section.cut(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert join(chunks) == bytes(state.payload)
    with pytest.raises(KvLayoutError, match="follow"):
        join([chunks[0], chunks[2]])


async def test_a_restored_prefix_is_that_prefix_to_llama_cpp(engine: Engine) -> None:
    """llama.cpp takes a prefix cut as the state of exactly those tokens (its own export
    of the slot gives the same bytes back), and, with V transposed (pcrt's default: no
    flash attention), continues exactly as those tokens computed from scratch. Flash
    attention's sums depend on the batch's shape, so there the continuation may differ
    by a rounding, as two prefills of different lengths do."""
    state = await _state(engine)
    k = 100
    cut = parse(state.payload).cut(0, k)
    prefix = KVState(state.key, state.tokens[:k], None, cut)
    await engine.clear_cache()
    seq_id = await engine.import_state(prefix)
    exported = bytes((await engine.export_slot(seq_id)).payload)
    assert exported == parse(cut).cut(0, k, seq_id=seq_id)  # the cells name their slot
    if engine.config.flash_attn:
        return
    sampling = SamplingParams(temperature=0.0, max_tokens=16)
    await engine.clear_cache()
    restored = await engine.generate(GenerateRequest(prompt=[], state=prefix, sampling=sampling))
    assert restored.cached_tokens == k - 1  # the last prompt token is decoded for logits
    await engine.clear_cache()
    afresh = await engine.generate(GenerateRequest(prompt=state.tokens[:k], sampling=sampling))
    assert afresh.cached_tokens == 0
    assert restored.text == afresh.text


def test_what_is_not_a_plain_section_is_refused() -> None:
    with pytest.raises(KvLayoutError):
        parse(b"\x01\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(KvLayoutError, match="order"):
        # two cells at positions 1 and 0
        cells = bytes.fromhex("01000000 01000000 00000000 00000000 01000000 00000000")
        parse(b"\x02\x00\x00\x00" + cells)
