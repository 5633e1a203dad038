"""Sampling parameters change what the engine samples, and a fork prefills its prompt once.

On the real default model (SmolLM2-135M). Each truncating sampler is checked against a
control: the same seed and temperature without it gives a different text, so "equals
greedy" can only hold because the sampler acted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from pcrt.runtime.engine import Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.sampling import SamplingParams

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# greedy decoding of this prompt loops on " pear," (3 distinct tokens in 30)
REPEATS = "List of fruits: apple, banana,"
LENGTH = 30
HOT = 1.5  # a temperature at which unconstrained sampling leaves the greedy path
SEED = 1
NO_EOS = {0: -1e9, 2: -1e9, 4: -1e9}  # SmolLM2's end-of-generation tokens
# one thread: two llama.cpp threads spin at barriers, and with another model process on
# the 2 shared cores a decode step slowed from ms to seconds (measured); one never waits
THREADS = 1


@pytest.fixture(scope="module")
def engine(default_model_path: Path) -> Iterator[Engine]:
    config = EngineConfig(parallel=2, context=512, n_threads=THREADS)
    with Engine(default_model_path, model_sha256=SHA256, config=config) as eng:
        yield eng


async def _tokens(engine: Engine, prompt: str = REPEATS, **sampling: Any) -> list[int]:
    params = SamplingParams(max_tokens=LENGTH, **sampling)
    result = await engine.generate(GenerateRequest(prompt=prompt, sampling=params))
    return result.choices[0].tokens


async def test_truncating_samplers_at_a_high_temperature_equal_greedy(engine: Engine) -> None:
    greedy = await _tokens(engine, temperature=0.0)
    assert len(greedy) == LENGTH
    # control: at this temperature and seed, nothing truncating leaves the greedy path
    free = await _tokens(engine, temperature=HOT, top_k=0, top_p=1.0, min_p=0.0, seed=SEED)
    assert free != greedy
    # each alone keeps only the most likely token, so the seeded draw has one candidate
    top_k = await _tokens(engine, temperature=HOT, top_k=1, top_p=1.0, min_p=0.0, seed=SEED)
    assert top_k == greedy
    top_p = await _tokens(engine, temperature=HOT, top_k=0, top_p=1e-4, min_p=0.0, seed=SEED)
    assert top_p == greedy
    min_p = await _tokens(engine, temperature=HOT, top_k=0, top_p=1.0, min_p=1.0, seed=SEED)
    assert min_p == greedy


@pytest.mark.parametrize(
    "penalty",
    [{"repeat_penalty": 1.8}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}],
    ids=lambda p: next(iter(p)),
)
async def test_each_penalty_changes_a_repetitive_greedy_output(
    engine: Engine, penalty: dict[str, float]
) -> None:
    greedy = await _tokens(engine, temperature=0.0)
    penalised = await _tokens(engine, temperature=0.0, **penalty)
    assert penalised != greedy
    # the penalty did what it is for: the text repeats less (more distinct tokens)
    assert len(set(greedy)) <= 5, "the prompt no longer makes greedy decoding repeat"
    assert len(set(penalised)) > 2 * len(set(greedy)), (greedy, penalised)


def _prompt_tokens_decoded(engine: Engine) -> int:
    """llama.cpp's own count of tokens decoded in multi-token batches (prompt chunks and
    batched decode steps) on the engine's context; reported as max(1, n). Read on the
    scheduler thread."""
    return int(llama_cpp.llama_perf_context(engine._ctx).n_p_eval)


async def test_a_fork_prefills_its_prompt_once(default_model_path: Path) -> None:
    """llama.cpp's counter on a cold engine: a 3-branch fork decodes the prompt once, where
    three separate cold runs decode it three times."""
    prompt = "Here is a long shared preamble about the sea and its ships. " * 12
    k = 6
    sampling = SamplingParams(temperature=0.0, max_tokens=k, logit_bias=NO_EOS)
    config = EngineConfig(parallel=3, context=512, n_threads=THREADS)
    with Engine(default_model_path, model_sha256=SHA256, config=config) as cold:
        assert await cold.call(lambda: _prompt_tokens_decoded(cold)) == 1  # nothing yet
        fork = await cold.generate(GenerateRequest(prompt=prompt, sampling=sampling, n=3))
        p = fork.prompt_tokens
        assert p > 100 and fork.cached_tokens == 0
        assert [len(c.tokens) for c in fork.choices] == [k] * 3
        after_fork = await cold.call(lambda: _prompt_tokens_decoded(cold))
        # the prompt once, then k - 1 steps that each decode one token of all 3 branches;
        # prefilling per branch would have counted 3 * p
        assert after_fork == p + 3 * (k - 1)
        # the counter sees every prefill: three runs from an empty cache cost 3 * p
        for _ in range(3):
            await cold.clear_cache()
            alone = await cold.generate(GenerateRequest(prompt=prompt, sampling=sampling))
            assert alone.cached_tokens == 0 and alone.choices[0].tokens == fork.choices[0].tokens
        separate = await cold.call(lambda: _prompt_tokens_decoded(cold))
        assert separate - after_fork == 3 * p  # one-token decode steps count elsewhere
