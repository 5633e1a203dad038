"""The engine on the real default model (SmolLM2-135M)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from pcrt.runtime.engine import (
    CheckpointEvent,
    Engine,
    EngineConfig,
    GenerateRequest,
    TokenEvent,
)
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.errors import (
    ChatTemplateMissing,
    ContextLengthExceeded,
    IncompatibleState,
    InvalidRequest,
    ModelLoadError,
    StateError,
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colours:\n1.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
# SmolLM2's end-of-generation tokens (0, 2, 4) banned: these runs go the whole length
LONG = SamplingParams(max_tokens=500, logit_bias={0: -1e9, 2: -1e9, 4: -1e9})


@pytest.fixture(scope="module")
def default_model_sha256() -> str:
    return "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def engine(default_model_path: Path, default_model_sha256: str) -> Iterator[Engine]:
    eng = Engine(
        default_model_path,
        model_sha256=default_model_sha256,
        config=EngineConfig(parallel=4, context=1024, n_threads=2),
        name="smollm2-135m",
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference_llama(default_model_path: Path):
    """llama-cpp-python's own high-level API: code nobody here wrote."""
    from llama_cpp import Llama

    llm = Llama(str(default_model_path), n_ctx=1024, n_threads=2, verbose=False)
    yield llm
    llm.close()


async def test_greedy_matches_llama_cpp_python(engine: Engine, reference_llama) -> None:
    for prompt in PROMPTS:
        ours = await engine.generate(GenerateRequest(prompt=prompt, sampling=GREEDY))
        theirs = reference_llama.create_completion(
            prompt, max_tokens=24, temperature=0.0, repeat_penalty=1.0
        )
        assert ours.text == theirs["choices"][0]["text"], prompt
        assert ours.prompt_tokens == theirs["usage"]["prompt_tokens"]


async def test_concurrent_requests_equal_each_alone(engine: Engine) -> None:
    alone = [
        (await engine.generate(GenerateRequest(prompt=p, sampling=GREEDY))).text for p in PROMPTS
    ]
    together = await asyncio.gather(
        *(engine.generate(GenerateRequest(prompt=p, sampling=GREEDY)) for p in PROMPTS)
    )
    assert [c.text for c in together] == alone


async def test_requests_sent_together_compute_their_shared_prefix_once(engine: Engine) -> None:
    """Three prompts with one long preamble, submitted at once into empty slots: the first
    computes the preamble, the others wait for it and copy its KV, and every answer equals
    the same prompt run alone."""
    preamble = "Minutes: " + "The committee met on Tuesday to review the annual report. " * 20
    prompts = [preamble + q for q in ("What was reviewed?", "When was it?", "Who met?")]
    alone = []
    for prompt in prompts:
        await engine.clear_cache()
        alone.append((await engine.generate(GenerateRequest(prompt=prompt, sampling=GREEDY))).text)
    await engine.clear_cache()
    together = await asyncio.gather(
        *(engine.generate(GenerateRequest(prompt=p, sampling=GREEDY)) for p in prompts)
    )
    assert [c.text for c in together] == alone
    tokens = [engine.prepare(GenerateRequest(prompt=p, sampling=GREEDY)) for p in prompts]
    shared = min(_common(tokens[0], t) for t in tokens[1:])
    assert shared > 200
    cached = sorted(c.cached_tokens for c in together)
    assert cached[0] == 0 and all(c >= shared for c in cached[1:]), (cached, shared)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def test_fork_greedy_equals_separate_runs(engine: Engine) -> None:
    prompt = "Write a short poem about the sea."
    single = await engine.generate(GenerateRequest(prompt=prompt, sampling=GREEDY))
    fork = await engine.generate(GenerateRequest(prompt=prompt, sampling=GREEDY, n=3))
    assert [c.text for c in fork.choices] == [single.text] * 3
    assert fork.prompt_tokens == single.prompt_tokens  # one prefill for all branches


async def test_seeded_fork_branches_differ_and_reproduce(engine: Engine) -> None:
    sampling = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    request = dict(prompt="My favourite animal is", sampling=sampling, n=3)
    first = await engine.generate(GenerateRequest(**request))
    second = await engine.generate(GenerateRequest(**request))
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1, texts
    assert texts == [c.text for c in second.choices]


async def test_schema_constrained_output_validates(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    sampling = SamplingParams(temperature=0.7, seed=7, max_tokens=80, json_schema=schema)
    messages = [ChatMessage(role="user", content="Invent a person. Reply in JSON.")]
    result = await engine.generate(GenerateRequest(messages=messages, sampling=sampling))
    assert result.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), schema)


async def test_raw_gbnf_grammar(engine: Engine) -> None:
    sampling = SamplingParams(
        temperature=1.0, seed=3, max_tokens=8, grammar='root ::= ("yes" | "no")'
    )
    result = await engine.generate(GenerateRequest(prompt="Is water wet?", sampling=sampling))
    assert result.text in ("yes", "no")


# llama.cpp's grammars/json.gbnf and grammars/list.gbnf, as users pass them today
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""
LIST_GBNF = r"""
root ::= item+
# Excludes various line break characters
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
"""


async def test_gbnf_grammars_users_pass_today_still_hold(engine: Engine) -> None:
    """GBNF is translated for llguidance (its own converter): each grammar's output is
    checked against the language it describes, not only for compiling."""

    async def constrained(prompt: str, grammar: str, max_tokens: int) -> tuple[str, str]:
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, grammar=grammar)
        messages = [ChatMessage(role="user", content=prompt)]
        result = await engine.generate(GenerateRequest(messages=messages, sampling=sampling))
        return result.text, str(result.choices[0].finish_reason)

    text, finish = await constrained('Write {"animal": "cat", "legs": 4} as JSON.', JSON_GBNF, 200)
    assert finish == "stop" and isinstance(json.loads(text), dict), text
    text, _ = await constrained("Name three fruits, one word each.", LIST_GBNF, 24)
    lines = text.split("\n")
    assert all(re.fullmatch(r"- [^\n]+", line) for line in lines[:-1]) and len(lines) > 1, text
    assert lines[-1] == "" or lines[-1].startswith("- "), text  # the cut line, if any
    shape = 'root ::= [A-Z] [a-z]{2,5} " " [0-9]{3}'
    text, finish = await constrained("A name and a number.", shape, 16)
    assert finish == "stop" and re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{3}", text), text


async def test_bad_grammar_and_schema_are_clear_errors(engine: Engine) -> None:
    with pytest.raises(InvalidRequest):
        await engine.generate(
            GenerateRequest(prompt="x", sampling=SamplingParams(grammar="root ::= (("))
        )
    with pytest.raises(InvalidRequest):
        await engine.generate(
            GenerateRequest(prompt="x", sampling=SamplingParams(json_schema={"type": "nonsense"}))
        )


async def test_prefix_reuse_reports_cached_tokens(engine: Engine) -> None:
    shared = "You are a careful assistant. Here is a long shared preamble. " * 8
    first = await engine.generate(GenerateRequest(prompt=shared + "Question one?", sampling=GREEDY))
    second = await engine.generate(
        GenerateRequest(prompt=shared + "Question two?", sampling=GREEDY)
    )
    preamble_tokens = len(engine.model.tokenize(shared))
    assert second.cached_tokens >= preamble_tokens - 1
    assert second.cached_tokens < second.prompt_tokens
    # the reused KV gives what a cold run gives
    cold = Engine(
        engine.model.path,
        model_sha256=engine.compat_key.model_sha256,
        config=EngineConfig(parallel=1, context=1024, n_threads=2),
    )
    with cold:
        again = await cold.generate(
            GenerateRequest(prompt=shared + "Question two?", sampling=GREEDY)
        )
    assert again.cached_tokens == 0
    assert again.text == second.text
    assert first.text  # both ran


async def test_stop_strings_cut_the_output(engine: Engine) -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=64)
    full = await engine.generate(GenerateRequest(prompt="Count: 1, 2, 3,", sampling=sampling))
    assert " 5," in full.text
    stop = SamplingParams(temperature=0.0, max_tokens=64, stop=(" 5,",))
    cut = await engine.generate(GenerateRequest(prompt="Count: 1, 2, 3,", sampling=stop))
    assert cut.text == full.text[: full.text.index(" 5,")]
    assert cut.choices[0].finish_reason == "stop"


async def test_max_tokens_and_finish_reason(engine: Engine) -> None:
    result = await engine.generate(
        GenerateRequest(
            prompt="Tell me a long story.",
            # end-of-sequence banned: the stop must come from max_tokens, whatever is sampled
            sampling=SamplingParams(max_tokens=5, logit_bias=LONG.logit_bias),
        )
    )
    assert result.completion_tokens == 5
    assert result.choices[0].finish_reason == "length"


async def test_export_import_continues_exactly(engine: Engine, default_model_path: Path) -> None:
    prompt = "The history of the printing press begins"
    whole = await engine.generate(
        GenerateRequest(prompt=prompt, sampling=SamplingParams(temperature=0.0, max_tokens=48))
    )
    half = await engine.generate(
        GenerateRequest(
            prompt=prompt,
            sampling=SamplingParams(temperature=0.0, max_tokens=24),
            export_state=True,
        )
    )
    state = half.choices[0].state
    assert state is not None and state.next_token is not None
    blob = state.to_bytes()
    # a fresh engine (another process would do the same): restore, then decode on
    fresh = Engine(
        default_model_path,
        model_sha256=engine.compat_key.model_sha256,
        config=EngineConfig(parallel=2, context=1024, n_threads=2),
    )
    with fresh:
        restored = KVState.from_bytes(blob)
        rest = await fresh.generate(
            GenerateRequest(
                prompt=[],
                state=restored,
                sampling=SamplingParams(temperature=0.0, max_tokens=24),
            )
        )
        # the same blob as a private writable buffer: framed in place of its header
        await fresh.clear_cache()
        writable = bytearray(blob)
        in_place = KVState.from_bytes(memoryview(writable), in_place=True)
        again = await fresh.generate(
            GenerateRequest(
                prompt=[],
                state=in_place,
                sampling=SamplingParams(temperature=0.0, max_tokens=24),
            )
        )
    assert rest.cached_tokens == len(restored.tokens)  # nothing recomputed but the pending token
    assert half.choices[0].tokens + rest.choices[0].tokens == whole.choices[0].tokens
    assert again.cached_tokens == len(restored.tokens)
    assert again.choices[0].tokens == rest.choices[0].tokens
    start = len(blob) - len(state.payload)  # only llama.cpp's 16-byte framing was written
    assert writable[: start - 16] == blob[: start - 16] and writable[start:] == blob[start:]


async def test_import_refuses_wrong_key_and_corrupt_blob(engine: Engine) -> None:
    result = await engine.generate(
        GenerateRequest(prompt="Hello", sampling=SamplingParams(max_tokens=4), export_state=True)
    )
    state = result.choices[0].state
    assert state is not None
    wrong = KVState(
        key=state.key.model_copy(update={"model_sha256": "0" * 64}),
        tokens=state.tokens,
        next_token=state.next_token,
        payload=state.payload,
    )
    with pytest.raises(IncompatibleState, match="model_sha256"):
        await engine.import_state(wrong)
    other_kv = state.key.model_copy(update={"type_k": "q8_0"})
    with pytest.raises(IncompatibleState, match="type_k"):
        engine.submit(GenerateRequest(prompt=[], state=KVState(other_kv, state.tokens, 1, b"")))
    blob = bytearray(state.to_bytes())
    blob[-10] ^= 0xFF
    with pytest.raises(StateError, match="sha256"):
        KVState.from_bytes(bytes(blob))
    with pytest.raises(StateError):
        KVState.from_bytes(b"garbage")
    # the right key, forged token ids: refused before llama.cpp would index with them
    forged = KVState(state.key, [*state.tokens[:-1], 10**6], state.next_token, state.payload)
    with pytest.raises(StateError, match="vocabulary"):
        await engine.import_state(forged)
    with pytest.raises(StateError, match="vocabulary"):
        engine.submit(GenerateRequest(prompt=[], state=KVState(state.key, state.tokens, -1, b"")))


async def test_cancel_frees_the_slot_at_once(engine: Engine) -> None:
    handle = engine.submit(GenerateRequest(prompt="Write an essay.", sampling=LONG))
    seen = 0
    async for event in handle:
        if isinstance(event, TokenEvent):
            seen += 1
            if seen == 3:
                handle.cancel()
    assert handle.result is not None
    assert handle.result.choices[0].finish_reason == "cancelled"
    assert handle.result.completion_tokens < 50
    assert engine.busy_slots == 0


async def test_abandoned_consumer_cancels(engine: Engine) -> None:
    handle = engine.submit(GenerateRequest(prompt="Write an essay.", sampling=LONG))
    async for _ in handle:
        break  # leaving the loop early cancels the request
    for _ in range(100):
        if engine.busy_slots == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.busy_slots == 0


async def test_prompt_over_context_is_refused_before_work(engine: Engine) -> None:
    long_prompt = "word " * 2000
    with pytest.raises(ContextLengthExceeded, match="1023"):
        engine.submit(GenerateRequest(prompt=long_prompt))
    assert engine.busy_slots == 0


async def test_fork_needs_enough_slots(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="slots"):
        engine.submit(GenerateRequest(prompt="x", n=5))


async def test_chat_uses_the_model_template(engine: Engine) -> None:
    messages = [ChatMessage(role="user", content="Say hello.")]
    prompt = engine.chat.render(messages)
    assert "<|im_start|>user\nSay hello.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    result = await engine.generate(GenerateRequest(messages=messages, sampling=GREEDY))
    assert result.text.strip()


async def test_model_without_template_is_a_clear_error(
    default_model_path: Path, default_model_sha256: str
) -> None:
    eng = Engine(
        default_model_path,
        model_sha256=default_model_sha256,
        config=EngineConfig(parallel=1, context=256, n_threads=2),
        name="no-template",
    )
    eng.chat._formatter = None  # as a GGUF without tokenizer.chat_template loads
    with eng, pytest.raises(ChatTemplateMissing, match="chat_template"):
        eng.submit(GenerateRequest(messages=[ChatMessage(role="user", content="hi")]))


async def test_embeddings_are_normalised_and_meaningful(engine: Engine) -> None:
    cat, kitten, tax = await engine.embed(
        [
            "The cat sleeps on the sofa.",
            "A kitten naps on the couch.",
            "Quarterly tax filing rules.",
        ]
    )
    assert len(cat) == engine.model.n_embd
    assert abs(sum(v * v for v in cat) - 1.0) < 1e-4

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(cat, kitten) > cos(cat, tax)


async def test_events_survive_a_consumer_that_stops_and_comes_back(engine: Engine) -> None:
    """One decode step can carry a token, the finish and the completion together."""
    handle = engine.submit(GenerateRequest(prompt="Hi", sampling=SamplingParams(max_tokens=1)))
    async for event in handle:
        assert isinstance(event, TokenEvent)
        break
    result = await handle.completion()
    assert result.completion_tokens == 1


async def test_checkpoints_resume_exactly(engine: Engine) -> None:
    """A checkpoint taken mid-generation continues as if nothing had happened."""
    prompt = "The story of the old lighthouse keeper begins"
    sampling = SamplingParams(temperature=0.0, max_tokens=40, logit_bias=LONG.logit_bias)
    handle = engine.submit(GenerateRequest(prompt=prompt, sampling=sampling, checkpoint_every=16))
    checkpoints = [e async for e in handle if isinstance(e, CheckpointEvent)]
    whole = await handle.completion()
    assert [len(c.tokens) for c in checkpoints] == [16, 32]
    second = checkpoints[1]
    assert second.state.next_token == second.tokens[-1]
    assert whole.choices[0].tokens[:32] == second.tokens
    rest = await engine.generate(
        GenerateRequest(
            prompt=[],
            state=second.state,
            sampling=sampling.model_copy(update={"max_tokens": 40 - 32}),
        )
    )
    assert rest.cached_tokens == len(second.state.tokens)
    assert second.tokens + rest.choices[0].tokens == whole.choices[0].tokens


async def test_a_broken_chat_template_is_a_clear_load_error(
    default_model_path: Path, default_model_sha256: str
) -> None:
    with pytest.raises(ModelLoadError, match="chat template"):
        Engine(
            default_model_path,
            model_sha256=default_model_sha256,
            config=EngineConfig(parallel=1, context=256, n_threads=2),
            chat_template="{% if %}",
        )


def test_gpu_placement_reaches_llama_cpp(
    default_model_path: Path, default_model_sha256: str
) -> None:
    """A plan's main_gpu and tensor_split are passed to llama.cpp (a CPU-only build ignores
    them and loads on the CPU, which is what must happen on this machine)."""
    config = EngineConfig(
        parallel=1, context=256, n_threads=2, main_gpu=0, tensor_split=(0.75, 0.25)
    )
    with Engine(default_model_path, model_sha256=default_model_sha256, config=config) as eng:
        assert list(eng.model._tensor_split)[:2] == [0.75, 0.25]
        assert eng.model.tokenize("hi")
