"""Structured output over HTTP on the real default model: the OpenAI SDK's own structured
outputs (``strict: true`` from a pydantic model) and LangChain's; ``strict`` on or off
giving one constrained answer, and ``pcrt run --schema`` giving it too;
``finish_reason: "length"`` when max_tokens cuts a value; every schema or grammar
constrained decoding cannot take refused with a 400 that names the field, before a
stream starts, and the daemon healthy after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from click.testing import CliRunner

from pcrt.cli.main import main
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

KEY = "test-key"
MODEL = "smollm2-135m"
PROMPT = "Name a city and its country as JSON."
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(default_model_path: Path, module_live_server: ServerFactory) -> LiveServer:
    settings = ServerSettings(parallel=2, context=1024, n_threads=2, queue_size=4, api_key=KEY)
    return module_live_server(settings)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.sdk()


def _post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    with server.http(timeout=120) as h:
        return h.post("/v1/chat/completions", json={"model": MODEL, **body})


def _city(client: openai.OpenAI, **format_extra: Any) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, **format_extra},
        },
        temperature=0,
        max_tokens=100,
    )
    assert reply.choices[0].finish_reason == "stop"
    return reply.choices[0].message.content or ""


class Film(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=40)
    year: int = pydantic.Field(ge=1880, le=2030)
    genre: Literal["drama", "comedy", "horror", "action"]


def test_the_sdks_structured_outputs_parse(client: openai.OpenAI) -> None:
    """``client.chat.completions.parse`` sends the pydantic model's schema with
    ``strict: true`` and parses the answer back into the model."""
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a film, its year and its genre."}],
        response_format=Film,
        temperature=0,
        max_tokens=100,
    )
    film = completion.choices[0].message.parsed
    assert isinstance(film, Film) and 1880 <= film.year <= 2030


def test_langchains_structured_output_parses(server: LiveServer) -> None:
    """LangChain's ``with_structured_output`` as its users call it against any OpenAI
    endpoint: a pydantic model through ``json_schema`` (strict), and JSON mode."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key=KEY,
        model=MODEL,
        temperature=0,
        max_tokens=100,  # type: ignore[call-arg]
        max_retries=0,
    )
    prompt = "Name a film, its year and its genre."
    film = chat.with_structured_output(Film, method="json_schema", strict=True).invoke(prompt)
    assert isinstance(film, Film) and 1880 <= film.year <= 2030
    as_json = chat.with_structured_output(method="json_mode").invoke(
        'Reply with a JSON object with one key, "name".'
    )
    assert isinstance(as_json, dict)


def test_strict_or_not_and_the_cli_give_one_constrained_answer(
    client: openai.OpenAI, server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output is always constrained: ``strict: true`` changes nothing, and ``pcrt run
    --schema`` (which sends ``strict: true`` to a daemon) answers the same, greedy."""
    strict = _city(client, strict=True)
    assert _city(client, strict=False) == _city(client) == strict
    jsonschema.validate(json.loads(strict), CITY)
    schema_file = tmp_path / "city.json"
    schema_file.write_text(json.dumps(CITY))
    monkeypatch.setenv("PCRT_URL", server.url)
    monkeypatch.setenv("PCRT_API_KEY", KEY)
    args = ["run", "--json", "--schema", str(schema_file), "--temperature", "0", PROMPT]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["text"] == strict


def test_a_value_cut_by_max_tokens_finishes_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
        temperature=0,
        max_tokens=4,
    )
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content or "")


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    }


def _deep(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


BAD_INPUT = [
    (
        _schema(
            {
                "type": "object",
                "properties": {"tags": {"type": "array", "uniqueItems": True}},
            }
        ),
        "response_format.json_schema.schema.properties.tags.uniqueItems",
        "invalid_schema",
        "'uniqueItems' is not supported",
    ),
    (
        _schema({"type": "string", "format": "uri-reference"}),
        "response_format.json_schema.schema.format",
        "invalid_schema",
        "'uri-reference' is not supported",
    ),
    (_schema(_deep(100)), "response_format.json_schema.schema", "invalid_schema", "deep"),
    (
        _schema({"$ref": "#/$defs/nowhere"}),
        "response_format.json_schema.schema.$ref",
        "invalid_schema",
        "does not exist",
    ),
    ({"grammar": "root ::= (("}, "grammar", "invalid_grammar", "does not parse"),
    ({"grammar": 'root ::= "a" <|im_end|>'}, "grammar", "invalid_grammar", "token literals"),
    ({"grammar": "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000}, "grammar", None, "deep"),
    ({"grammar": 'root ::= "x"\n' * 2000}, "grammar", "invalid_grammar", "rules"),
]


@pytest.mark.parametrize(("extra", "param", "code", "says"), BAD_INPUT)
@pytest.mark.parametrize("stream", [False, True])
def test_what_cannot_be_constrained_is_a_400_naming_the_field(
    server: LiveServer, extra: dict[str, Any], param: str, code: str | None, says: str, stream: bool
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = _post(server, {"messages": messages, "max_tokens": 4, "stream": stream, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert code is None or error["code"] == code, error


def test_the_daemon_answers_on_after_bad_input(server: LiveServer, client: openai.OpenAI) -> None:
    for extra, *_ in BAD_INPUT:
        _post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra})
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    jsonschema.validate(json.loads(_city(client)), CITY)
