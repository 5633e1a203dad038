"""Lazy constraints (tool calls with ``tool_choice: auto``): the output is free until a
trigger, and the grammar holds from the token that began it. On the real default model:
a trigger found in the model's own words, starting inside a token; a special token as the
trigger, shown in the text; resumes before and after the trigger end as the whole run did;
batch neighbours are not disturbed. ``Trigger`` itself is checked on a table of pieces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcrt.runtime.engine import CheckpointEvent, Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import SamplingParams, Trigger

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2 Q4_1
ASK = [ChatMessage(role="user", content="Tell me about the city of Paris in two sentences.")]
AFTER = "%json " + json.dumps(
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
)


def _lazy(trigger: str, special: int | None = None) -> str:
    either = f"<[{special}]> | head" if special is not None else "head"
    return (
        "start: opening calls\n"
        f"opening: {either}\n"
        f"head[lazy]: TEXT {json.dumps(trigger)}\n"
        f"calls: {AFTER}\n"
        "TEXT: /(?s:.*)/\n"
    )


@pytest.fixture(scope="module")
def engine(default_model_path: Path) -> Iterator[Engine]:
    eng = Engine(
        default_model_path,
        model_sha256=SHA256,
        config=EngineConfig(parallel=2, context=2048, n_threads=2),
        name="smollm2-135m",
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
async def free_text(engine: Engine) -> str:
    sampling = SamplingParams(temperature=0.0, max_tokens=40)
    return (await engine.generate(GenerateRequest(messages=ASK, sampling=sampling))).text


def _trigger_inside_a_token(engine: Engine, text: str) -> tuple[str, int]:
    """A trigger from the model's own words whose first byte is not a token's first."""
    tokens = engine.model.tokenize(text, add_special=False, parse_special=False)
    starts, at = set(), 0
    for token in tokens:
        starts.add(at)
        at += len(engine.model.piece(token))
    raw = text.encode()
    for k in range(len(raw) // 3, len(raw) - 6):
        if (
            k not in starts
            and raw[k : k + 5].isascii()
            and raw[k : k + 5].strip() == raw[k : k + 5]
        ):
            return raw[k : k + 5].decode(), k
    raise AssertionError(f"no trigger found in {text!r}")


async def test_the_output_is_free_until_the_trigger_then_held_to_the_grammar(
    engine: Engine, free_text: str
) -> None:
    trigger, at = _trigger_inside_a_token(engine, free_text)
    sampling = SamplingParams(
        temperature=0.0, max_tokens=80, grammar=_lazy(trigger), grammar_triggers=(trigger,)
    )
    result = await engine.generate(GenerateRequest(messages=ASK, sampling=sampling))
    text = result.text
    assert text.startswith(free_text.encode()[:at].decode() + trigger), (text, free_text)
    value = json.loads(text[text.index(trigger) + len(trigger) :])
    assert set(value) == {"n"} and value["n"] <= 99
    assert result.choices[0].finish_reason == "stop"  # the grammar ended it


async def test_without_the_trigger_nothing_is_constrained(engine: Engine, free_text: str) -> None:
    sampling = SamplingParams(
        temperature=0.0,
        max_tokens=40,
        grammar=_lazy("<never written>"),
        grammar_triggers=("<never written>",),
    )
    result = await engine.generate(GenerateRequest(messages=ASK, sampling=sampling))
    assert result.text == free_text


async def test_a_special_token_trigger_opens_the_grammar_and_shows_in_the_text(
    engine: Engine,
) -> None:
    special = "<filename>"  # a control token of SmolLM2's vocabulary
    token = engine.model.special_token(special)
    assert token is not None and engine.model.special_token("Paris") is None
    sampling = SamplingParams(
        temperature=0.0,
        max_tokens=60,
        grammar=_lazy(special, token),
        grammar_triggers=(special,),
        shown_specials=(special,),
        logit_bias={token: 100.0},  # the model writes the token first
    )
    result = await engine.generate(GenerateRequest(messages=ASK, sampling=sampling))
    assert result.choices[0].tokens[0] == token
    assert result.text.startswith(special)
    assert set(json.loads(result.text[len(special) :])) == {"n"}


async def test_resumes_before_and_after_the_trigger_end_as_the_whole_run(
    engine: Engine, free_text: str
) -> None:
    trigger, _ = _trigger_inside_a_token(engine, free_text)
    sampling = SamplingParams(
        temperature=0.0, max_tokens=80, grammar=_lazy(trigger), grammar_triggers=(trigger,)
    )
    await engine.clear_cache()
    request = GenerateRequest(messages=ASK, sampling=sampling, checkpoint_every=4)
    handle = engine.submit(request, await engine.prepare_in_thread(request))
    checkpoints = [e async for e in handle if isinstance(e, CheckpointEvent)]
    whole = handle.result
    assert whole is not None and whole.choices[0].finish_reason == "stop"
    opened = whole.text.index(trigger)
    seen = set()
    for checkpoint in checkpoints:
        before = checkpoint.state.continuation[whole.prompt_tokens :]
        side = len(engine.model.detokenize(list(before))) > opened
        if side in seen:
            continue
        seen.add(side)
        await engine.clear_cache()
        rest = sampling.model_copy(update={"max_tokens": 80 - len(before)})
        resumed = await engine.generate(
            GenerateRequest(
                prompt=[], state=checkpoint.state, generated_prefix=tuple(before), sampling=rest
            )
        )
        assert engine.model.detokenize(list(before)) + resumed.text == whole.text
    assert seen == {False, True}


async def test_a_lazy_sequence_beside_a_free_one_in_one_batch(
    engine: Engine, free_text: str
) -> None:
    trigger, _ = _trigger_inside_a_token(engine, free_text)
    lazy = SamplingParams(
        temperature=0.0, max_tokens=80, grammar=_lazy(trigger), grammar_triggers=(trigger,)
    )
    free = SamplingParams(temperature=0.0, max_tokens=40)
    both = await asyncio.gather(
        engine.generate(GenerateRequest(messages=ASK, sampling=lazy)),
        engine.generate(GenerateRequest(messages=ASK, sampling=free)),
    )
    assert both[1].text == free_text
    assert trigger in both[0].text


# -- Trigger on a table of pieces -----------------------------------------------------------

PIECES = {1: b"Sure", 2: b" <", 3: b"tool", 4: b"_call", 5: b">", 6: b"x<tool", 7: b"<tool_call>"}


def test_trigger_finds_the_token_that_began_it() -> None:
    watch = Trigger(("<tool_call>",), PIECES.__getitem__)
    for token in (1, 2, 3, 4):
        assert watch.opened_by(token) is None
        watch.remember(token)
    assert watch.opened_by(5) == [2, 3, 4, 5]
    begun_inside = Trigger(("<tool_call>",), PIECES.__getitem__)
    begun_inside.remember(6)
    assert begun_inside.opened_by(4) is None
    begun_inside.remember(4)
    assert begun_inside.opened_by(5) == [6, 4, 5]
    assert Trigger(("<tool_call>",), PIECES.__getitem__).opened_by(7) == [7]


def test_trigger_keeps_only_what_a_trigger_could_span() -> None:
    watch = Trigger(("<tool_call>",), PIECES.__getitem__)
    for _ in range(10_000):
        watch.remember(1)
    assert sum(len(p) for _, p in watch._recent) < len("<tool_call>") + len(b"Sure")


def test_an_anchored_trigger_counts_only_at_the_start() -> None:
    """Llama 3's bare '{"name":' is a call as the whole reply, not as JSON in prose."""
    pieces = {1: b"  ", 2: b'{"name', 3: b'":', 4: b"Here", 5: b" is"}
    at_start = Trigger(("<|python_tag|>", '{"name":'), pieces.__getitem__, ('{"name":',))
    at_start.remember(1)
    at_start.remember(2)
    assert at_start.opened_by(3) == [2, 3]
    in_prose = Trigger(("<|python_tag|>", '{"name":'), pieces.__getitem__, ('{"name":',))
    for token in (4, 5, 1, 2):
        in_prose.remember(token)
    assert in_prose.opened_by(3) is None
