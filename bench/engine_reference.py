"""The references of bench.engine and bench.dag, each run in a process of its own.

    python -m bench.engine_reference single|four|dag MODEL_PATH THREADS

prints "TOKENS_PER_SECOND TOKENS" (for ``dag``: "SECONDS 0").
- ``single``: llama-cpp-python's high-level ``Llama`` streaming 128 greedy tokens;
- ``four``: llama.cpp itself decoding 4 sequences per ``llama_decode`` through the raw
  bindings (no engine around it);
- ``dag``: bench.dag's prompts one after another through ``Llama`` (the shared context
  is read from stdin).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import Llama

from pcrt.runtime.llama_model import LlamaModel

STORY = "Chapter 1\n\nThe rain had not stopped for three days when"
QUESTIONS = ["What was discussed?", "Who should act first?", "What is the main risk?"]
PROMPTS4 = [
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "Here is a detailed, step-by-step guide to baking bread at home.\n\nStep 1:",
    "The following is a long essay on the history of Rome.\n\n",
    "Dear diary, today was the strangest day of my life.",
]


def reference_single(llm: Any, max_tokens: int) -> tuple[float, int]:
    stamps = []
    llm.reset()  # no prefix reuse between repeats, like ours (different slots aside)
    for chunk in llm.create_completion(
        STORY, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=True
    ):
        if chunk["choices"][0]["finish_reason"] is None:  # the last chunk carries no token
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def raw_four(model: LlamaModel, n_tokens: int, threads: int, context: int) -> float:
    """llama.cpp alone: 4 sequences per llama_decode, greedy, EOS suppressed, no engine."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = context * 4
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = 4
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    # as the engine under test: llama.cpp's own default (auto) turns flash attention on,
    # which alone makes decode about 10% faster here and is a setting, not overhead
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    bias = (llama_cpp.llama_logit_bias * 1)()
    bias[0].token, bias[0].bias = model.eos_id, -1e9
    samplers = []
    for _ in range(4):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, 1, bias)
        )
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        samplers.append(chain)

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    try:
        prompts = [model.tokenize(p) for p in PROMPTS4]
        n = 0
        rows: list[int] = []
        for seq, tokens in enumerate(prompts):
            for pos, token in enumerate(tokens):
                put(n, token, pos, seq, pos == len(tokens) - 1)
                n += 1
            rows.append(n - 1)
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
        nxt = [llama_cpp.llama_sampler_sample(samplers[s], ctx, rows[s]) for s in range(4)]
        positions = [len(t) for t in prompts]
        start = time.perf_counter()
        for _ in range(n_tokens - 1):
            for s in range(4):
                put(s, nxt[s], positions[s], s, True)
                positions[s] += 1
            batch.n_tokens = 4
            assert llama_cpp.llama_decode(ctx, batch) == 0
            nxt = [llama_cpp.llama_sampler_sample(samplers[s], ctx, s) for s in range(4)]
        return 4 * (n_tokens - 1) / (time.perf_counter() - start)
    finally:
        for chain in samplers:
            llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def dag_sequential(llm: Llama, text: str) -> float:
    """The same prompts, one after another, through llama-cpp-python's high-level API."""
    llm.reset()
    start = time.perf_counter()
    brief: list[Any] = [{"role": "user", "content": f"Read this:\n{text}\nNoted?"}]
    reply: Any = llm.create_chat_completion(brief, temperature=0, max_tokens=32)
    answer = reply["choices"][0]["message"]["content"]
    base: list[Any] = [*brief, {"role": "assistant", "content": answer}]
    for i in range(4):
        llm.create_chat_completion(
            [*base, {"role": "user", "content": "Suggest one follow-up."}],
            temperature=0.8, seed=7 + i, max_tokens=32,
        )  # fmt: skip
    for question in QUESTIONS:
        llm.create_chat_completion(
            [*base, {"role": "user", "content": question}], temperature=0, max_tokens=32
        )
    return time.perf_counter() - start


def main() -> None:
    kind, path, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if kind == "dag":
        llm = Llama(str(path), n_ctx=2304, n_threads=threads, verbose=False)
        print(dag_sequential(llm, sys.stdin.read()), 0)
        return
    if kind == "single":
        llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
        reference_single(llm, 4)  # warm up
        rate, tokens = reference_single(llm, 128)
    else:
        rate, tokens = raw_four(LlamaModel(path), 128, threads, 1024), 4 * 128
    print(rate, tokens)


if __name__ == "__main__":
    main()
