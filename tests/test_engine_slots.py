"""Which slot a prompt goes to, on the real default model (SmolLM2-135M)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pcrt.runtime.engine import Completion, Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.prefix import common_prefix
from pcrt.runtime.engine.sampling import SamplingParams

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SHORT = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def engine(default_model_path: Path) -> Iterator[Engine]:
    config = EngineConfig(parallel=3, context=2048, n_threads=2)
    with Engine(default_model_path, model_sha256=SHA256, config=config) as eng:
        yield eng


def system_prompt(name: str, things: tuple[str, ...]) -> str:
    rules = [
        f"Rule {i}: {name} counts the {things[i % len(things)]} in crate {i} and reports "
        "the total before noon."
        for i in range(1, 33)
    ]
    return f"You are {name}, a warehouse agent. " + " ".join(rules)


AGENTS = {
    "Alpha": system_prompt("Alpha", ("apples", "bolts", "candles")),
    "Bravo": system_prompt("Bravo", ("ropes", "tiles", "lamps")),
}


async def turn(engine: Engine, messages: list[ChatMessage]) -> Completion:
    return await engine.generate(GenerateRequest(messages=messages, sampling=SHORT))


async def test_two_agents_taking_turns_each_find_their_own_prefix(engine: Engine) -> None:
    """Two chats with distinct ~700-token system prompts alternate on an engine with free
    slots: each second turn finds its first turn cached, where choosing by the longest
    common prefix put both in one slot (their common prefix is the template's opening, 7
    tokens here) and each turn recomputed the whole prompt."""
    await engine.clear_cache()
    chats = {
        name: [
            ChatMessage(role="system", content=text),
            ChatMessage(role="user", content="How many crates are there?"),
        ]
        for name, text in AGENTS.items()
    }
    first: dict[str, Completion] = {}
    for name, messages in chats.items():
        first[name] = await turn(engine, messages)
        messages += [
            ChatMessage(role="assistant", content=first[name].text),
            ChatMessage(role="user", content="And which crate is the last one?"),
        ]
    prompts = [engine.tokenize_request(GenerateRequest(messages=m)) for m in chats.values()]
    opening = common_prefix(*prompts)  # the chat template's opening
    assert opening < 16
    assert all(600 < r.prompt_tokens < 900 for r in first.values()), first
    assert first["Bravo"].cached_tokens <= opening  # a slot of its own, not Alpha's
    for name, messages in chats.items():
        second = await turn(engine, messages)
        # the whole first prompt is found again; only the reply and the new turn run
        assert second.cached_tokens >= first[name].prompt_tokens - 1, (name, second)
        assert second.cached_tokens < second.prompt_tokens
    assert sorted(s.n_tokens > 600 for s in engine.slots()) == [False, True, True]
