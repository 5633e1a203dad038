"""Structured output validates against its schema (issue 17): every case of
``tests/schema_corpus.py`` generated greedily by the real default model, parsed and
validated with ``jsonschema``, formats included (date-time, uuid, email).

Four at a time, as four agents would ask: one batch, each sequence constrained by its own
schema.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pcrt.runtime.engine import (
    CheckpointEvent,
    Completion,
    Engine,
    EngineConfig,
    GenerateRequest,
)
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import Guide, SamplingParams
from pcrt.runtime.errors import InvalidRequest, StateError
from tests.schema_corpus import CORPUS, Case

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2 Q4_1
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def engine(default_model_path: Path) -> Iterator[Engine]:
    eng = Engine(
        default_model_path,
        model_sha256=SHA256,
        config=EngineConfig(parallel=4, context=4096, n_threads=2),
        name="smollm2-135m",
    )
    yield eng
    eng.close()


def _problems(case: Case, text: str, finish: str) -> list[str]:
    """Why ``text`` is not a valid answer to ``case`` (empty when it is)."""
    if finish != "stop":
        return [f"finished by {finish!r} after {MAX_TOKENS} tokens: {text[:120]!r}"]
    try:
        value = json.loads(text)
    except ValueError as exc:
        return [f"not JSON ({exc}): {text[:120]!r}"]
    validator = jsonschema.Draft202012Validator(
        case.schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(value)]


def _request(case: Case, n: int = 1) -> GenerateRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, json_schema=case.schema)
    prompt = f"{case.prompt} Answer in JSON."
    messages = [ChatMessage(role="user", content=prompt)]
    return GenerateRequest(messages=messages, sampling=sampling, n=n)


async def _answer(engine: Engine, case: Case) -> tuple[str, str]:
    result = await engine.generate(_request(case))
    return result.text, str(result.choices[0].finish_reason)


@pytest.fixture(scope="module")
async def batched(engine: Engine) -> list[tuple[str, str] | BaseException]:
    """Every case's answer, all submitted at once: four sequences per batch, each with
    its own schema."""
    return await asyncio.gather(*(_answer(engine, case) for case in CORPUS), return_exceptions=True)


# one of each kind: nested objects, enum, anyOf, $ref, pattern, formats, number bounds
SAMPLE = (
    "person",
    "three levels",
    "sentiment",
    "oneOf shapes",
    "nested refs",
    "code",
    "event",
    "score",
)


async def test_every_corpus_answer_validates_against_its_schema(
    batched: list[tuple[str, str] | BaseException],
) -> None:
    answers = batched
    failed: dict[str, list[str]] = {}
    for case, answer in zip(CORPUS, answers, strict=True):
        if isinstance(answer, BaseException):
            failed[case.name] = [f"{type(answer).__name__}: {answer}"]
        elif problems := _problems(case, *answer):
            failed[case.name] = problems
    print(f"{len(CORPUS) - len(failed)} of {len(CORPUS)} validate")
    assert failed == {}, json.dumps(failed, indent=1)


async def test_greedy_answers_are_the_same_alone_and_in_a_batch(
    engine: Engine, batched: list[tuple[str, str] | BaseException]
) -> None:
    """Each sequence's grammar state is its own: a batch neighbour with another schema
    changes nothing. One sample may differ, if its answer still validates: llama.cpp's
    CPU kernels may round a batch of several sequences differently from one alone (the
    batch's shape changes a matmul's summation order), and a greedy pick at a near tie
    then flips (seen once in CI, on "event"). A grammar leaking between sequences would
    break answers and their validity, not one answer's tie."""
    by_name = dict(zip((c.name for c in CORPUS), batched, strict=True))
    assert set(SAMPLE) <= set(by_name)
    differ = []
    for case in CORPUS:
        if case.name in SAMPLE:
            in_batch = by_name[case.name]
            assert not isinstance(in_batch, BaseException), case.name
            if await _answer(engine, case) != in_batch:
                differ.append(case.name)
                assert _problems(case, *in_batch) == [], case.name
    assert len(differ) <= 1, differ


async def test_greedy_fork_branches_each_follow_the_schema_the_same_way(
    engine: Engine, batched: list[tuple[str, str] | BaseException]
) -> None:
    """A fork's branches sample one shared first row, then each advances a copy of the
    grammar: greedy, all equal the unforked answer."""
    by_name = dict(zip((c.name for c in CORPUS), batched, strict=True))
    for case in CORPUS:
        if case.name in SAMPLE[:3]:
            result = await engine.generate(_request(case, n=3))
            answer = by_name[case.name]
            assert isinstance(answer, tuple)
            assert [c.text for c in result.choices] == [answer[0]] * 3, case.name


async def test_a_resumed_generation_replays_its_grammar_and_ends_the_same(engine: Engine) -> None:
    """A checkpoint restored with the tokens generated before it: the grammar replays them
    and the rest is what the uninterrupted run wrote, valid against the schema."""
    case = next(c for c in CORPUS if c.name == "kitchen sink")
    await engine.clear_cache()  # both runs prefill cold: see test_dag_run's resume test
    request = _request(case)
    request = GenerateRequest(
        messages=request.messages, sampling=request.sampling, checkpoint_every=16
    )
    handle = engine.submit(request, await engine.prepare_in_thread(request))
    checkpoints = [e async for e in handle if isinstance(e, CheckpointEvent)]
    whole = handle.result
    assert whole is not None and whole.choices[0].finish_reason == "stop"
    assert len(checkpoints) >= 2, whole.completion_tokens
    state = checkpoints[1].state
    before = state.continuation[whole.prompt_tokens :]
    assert len(before) == 32
    await engine.clear_cache()
    sampling = request.sampling.model_copy(update={"max_tokens": MAX_TOKENS - len(before)})
    resumed = await engine.generate(
        GenerateRequest(prompt=[], state=state, generated_prefix=tuple(before), sampling=sampling)
    )
    text = engine.model.detokenize(before) + resumed.text
    assert text == whole.text
    assert _problems(case, text, str(resumed.choices[0].finish_reason)) == []


async def test_tokens_that_left_the_grammar_cannot_be_resumed(engine: Engine) -> None:
    case = next(c for c in CORPUS if c.name == "person")
    stray = tuple(engine.model.tokenize("hello", add_special=False, parse_special=False))
    sampling = SamplingParams(temperature=0.0, max_tokens=8, json_schema=case.schema)
    request = GenerateRequest(prompt="Hi", generated_prefix=stray, sampling=sampling)
    with pytest.raises(StateError, match="do not fit its grammar"):
        await engine.generate(request)
    assert await engine.generate(_request(case))  # the engine runs on


async def test_a_matcher_that_fails_mid_output_fails_its_request_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A matcher in llguidance's error state (a runtime limit, a refused token) allows
    only the end: the request must fail with the reason, never end "stop" with broken
    JSON, and its batch neighbour runs on."""
    made: list[Guide] = []
    real_init, real_pick = Guide.__init__, Guide.pick
    stray = engine.model.tokenize("zzz", add_special=False, parse_special=False)[0]

    def init(self: Guide, *args: Any) -> None:
        real_init(self, *args)
        made.append(self)

    def pick(self: Guide, chain: Any, logits: Any, first: int | None = None) -> int:
        if self is made[0] and len(made) > 1 and self.matcher is not None:
            self.matcher.consume_token(stray)  # JSON cannot start so: the matcher fails
        return real_pick(self, chain, logits, first)

    monkeypatch.setattr(Guide, "__init__", init)
    monkeypatch.setattr(Guide, "pick", pick)
    doomed, neighbour = (_request(c) for c in CORPUS if c.name in ("person", "book"))
    # prepared first, then submitted in order: the scheduler places the doomed one first
    prepared = [await engine.prepare_in_thread(r) for r in (doomed, neighbour)]
    handles = [engine.submit(r, p) for r, p in zip((doomed, neighbour), prepared, strict=True)]
    results = await asyncio.gather(*(h.completion() for h in handles), return_exceptions=True)
    assert isinstance(results[0], InvalidRequest), results[0]
    assert "constrained decoding failed" in str(results[0])
    finished = results[1]
    assert isinstance(finished, Completion)
    book = next(c for c in CORPUS if c.name == "book")
    assert _problems(book, finished.text, str(finished.choices[0].finish_reason)) == []
    monkeypatch.undo()
    person = next(c for c in CORPUS if c.name == "person")
    assert _problems(person, *await _answer(engine, person)) == []  # the engine runs on


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.8, "seed": 5},  # llama.cpp's pick first, then the check
        {"temperature": 0.8, "seed": 5, "repeat_penalty": 1.3, "presence_penalty": 0.5},
    ],
)
async def test_sampled_answers_validate_with_and_without_penalties(
    engine: Engine, extra: dict[str, Any]
) -> None:
    """Penalties count what the chain accepts, so with them the check comes before the
    accept (a refused token must not be counted); without them llama.cpp picks first."""
    for case in CORPUS:
        if case.name in SAMPLE[:4]:
            sampling = SamplingParams(max_tokens=MAX_TOKENS, json_schema=case.schema, **extra)
            messages = [ChatMessage(role="user", content=f"{case.prompt} Answer in JSON.")]
            result = await engine.generate(GenerateRequest(messages=messages, sampling=sampling))
            finish = str(result.choices[0].finish_reason)
            assert _problems(case, result.text, finish) == [], case.name
