"""``pcrt bench``'s measurement: prefill and decode speed through the real engine.

One warm-up request (the first decode allocates buffers), then for each repeat: the slots'
cached KV is dropped (no prefix reuse), a prompt of exactly ``prompt_tokens`` tokens is
prefilled in one request and ``decode_tokens`` more are generated greedily with the end of
text banned, so every run does the same work. Prefill time is admission to the first
sampled token; decode time runs from there to the last token.
"""

from __future__ import annotations

from collections.abc import Callable

from pcrt.device.bench import BenchFigures, best_of
from pcrt.runtime.engine import Engine, GenerateRequest, TokenEvent
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.errors import InvalidRequest

__all__ = ["BenchProgress", "bench_prompt", "run_bench"]

BenchProgress = Callable[[str, int, int], None]
"""Called with (phase, done, total): phase is "warm-up", "prefill" or "decode"."""

_FILLER = (
    "The history of computing is a story of machines that became smaller, faster and "
    "cheaper, until a device in a pocket held more power than a room of early computers. "
    "Each generation brought new ideas about memory, storage and the way people work. "
)


def bench_prompt(engine: Engine, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` prompt tokens (BOS first when the model adds one)."""
    text = _FILLER
    tokens = engine.model.tokenize(text, add_special=True, parse_special=False)
    while len(tokens) < n_tokens:
        text += _FILLER
        tokens = engine.model.tokenize(text, add_special=True, parse_special=False)
    return tokens[:n_tokens]


async def run_bench(
    engine: Engine,
    *,
    prompt_tokens: int = 256,
    decode_tokens: int = 64,
    repeats: int = 1,
    progress: BenchProgress | None = None,
) -> BenchFigures:
    """The best of ``repeats`` runs (see the module docstring)."""
    if prompt_tokens < 1 or decode_tokens < 2 or repeats < 1:
        raise InvalidRequest("a benchmark needs >= 1 prompt token, >= 2 decoded, >= 1 repeat")
    room = engine.context_per_slot - decode_tokens - 1
    if prompt_tokens > room:
        raise InvalidRequest(
            f"{prompt_tokens} prompt + {decode_tokens} decoded tokens do not fit the context "
            f"of {engine.context_per_slot}: use fewer, or a larger --ctx"
        )
    report = progress or (lambda phase, done, total: None)
    prompt = bench_prompt(engine, prompt_tokens)
    no_eos = {engine.model.eos_id: -1e9} if engine.model.eos_id >= 0 else {}

    def request(tokens: list[int], n: int) -> GenerateRequest:
        sampling = SamplingParams(temperature=0.0, max_tokens=n, logit_bias=no_eos)
        return GenerateRequest(prompt=tokens, sampling=sampling)

    report("warm-up", 0, 1)
    await engine.generate(request(prompt[: min(8, len(prompt))], 2))
    report("warm-up", 1, 1)
    runs = []
    for _ in range(repeats):
        await engine.clear_cache()
        report("prefill", 0, prompt_tokens)
        handle = engine.submit(request(prompt, decode_tokens))
        done = 0
        async for event in handle:
            if isinstance(event, TokenEvent) and event.token >= 0:
                if done == 0:
                    report("prefill", prompt_tokens, prompt_tokens)
                done += 1
                report("decode", done, decode_tokens)
        result = handle.result
        assert result is not None and result.t_first_token is not None
        runs.append(
            BenchFigures(
                prompt_tokens=result.prompt_tokens - result.cached_tokens,
                prefill_seconds=result.prompt_seconds,
                decode_tokens=max(0, result.completion_tokens - 1),
                decode_seconds=result.t_done - result.t_first_token,
            )
        )
    return best_of(runs)
