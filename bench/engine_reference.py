"""The references of bench.engine and bench.dag, each run in a process of its own.

    python -m bench.engine_reference single|four|fork|dag MODEL_PATH THREADS

prints "TOKENS_PER_SECOND TOKENS" (``dag``: "SECONDS 0"; ``fork``: "RATIO 0").
- ``single``: llama-cpp-python's high-level ``Llama`` streaming 128 greedy tokens;
- ``four``: llama.cpp itself decoding 4 sequences per ``llama_decode`` through the raw
  bindings (no engine around it);
- ``fork``: llama.cpp itself doing bench.engine's fork and its 4 independent runs: the
  fork ratio's floor on this machine;
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

from pcrt.runtime.engine.llama_model import LlamaModel

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
    bias[0].token, bias[0].bias = llama_cpp.llama_token(model.eos_id), -1e9
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


FORK_TEXT = (
    "The committee met on Tuesday to review the annual report. Members discussed the "
    "budget, the hiring plan, the new office, and the timeline for the product launch. "
)


def raw_fork(model: LlamaModel, threads: int, n_prompt: int, n: int, max_tokens: int) -> float:
    """llama.cpp alone doing what bench.engine's fork row times: one prefill of
    ``n_prompt`` tokens copied to ``n`` sequences decoded together, over ``n`` prefills
    each decoded alone. The ratio is this machine's floor for the fork: it is what the
    CPU gives, with no engine around it."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 1024 * n
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = n
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the engine
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    prompt = model.tokenize(FORK_TEXT * (n_prompt // 20 + 10))[:n_prompt]

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def prefill() -> None:
        for start in range(0, len(prompt), 512):
            chunk = prompt[start : start + 512]
            for i, token in enumerate(chunk):
                put(i, token, start + i, 0, start + i == len(prompt) - 1)
            batch.n_tokens = len(chunk)
            assert llama_cpp.llama_decode(ctx, batch) == 0

    def decode(seqs: int) -> None:  # the token is fixed: sampling is not what is timed
        for step in range(max_tokens):
            for s in range(seqs):
                put(s, prompt[step], len(prompt) + step, s, True)
            batch.n_tokens = seqs
            assert llama_cpp.llama_decode(ctx, batch) == 0

    try:
        prefill()  # warm: the first decodes allocate; the fork must not pay for that
        decode(1)
        llama_cpp.llama_memory_clear(memory, True)
        start = time.perf_counter()
        prefill()
        for s in range(1, n):
            llama_cpp.llama_memory_seq_cp(memory, 0, s, -1, -1)
        decode(n)
        fork = time.perf_counter() - start
        independent = 0.0
        for _ in range(n):
            llama_cpp.llama_memory_clear(memory, True)
            start = time.perf_counter()
            prefill()
            decode(1)
            independent += time.perf_counter() - start
        return fork / independent
    finally:
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
            temperature=0.8,
            seed=7 + i,
            max_tokens=32,
        )
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
    if kind == "fork":
        print(raw_fork(LlamaModel(path), threads, 500, 4, 64), 0)
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
