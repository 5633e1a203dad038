"""Input that once reached a bare 500 (found by fuzzing the API): each is a clear 4xx
now, and nothing it touched is half-recorded. The daemon would load the real default
model, but each request is refused before it gets that far."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import httpx
import pytest

from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.server.settings import ServerSettings
from tests.live_server import LiveServer, ServerFactory

MODEL = "smollm2-135m"
LONE = "\\ud800"  # as JSON escapes it: half of a UTF-16 pair, no text on its own


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(parallel=1, context=512))


def _post(server: LiveServer, path: str, raw: str) -> httpx.Response:
    return httpx.post(
        server.url + path,
        content=raw.encode(),
        timeout=60,
        headers={"content-type": "application/json"},
    )


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(
    ("path", "raw", "where"),
    [
        (
            "/v1/completions",
            f'{{"model": "{MODEL}", "prompt": "{LONE}", "max_tokens": 1}}',
            "the body.prompt",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "{MODEL}", "max_tokens": 1, "messages": '
            f'[{{"role": "user", "content": "a{LONE}b"}}]}}',
            "the body.messages[0].content",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "{MODEL}", "max_tokens": 1, "user": "{LONE}", '
            '"messages": [{"role": "user", "content": "hi"}]}',
            "the body.user",
        ),
        (
            "/v1/embeddings",
            f'{{"model": "{MODEL}", "input": ["ok", "{LONE}"]}}',
            "the body.input[1]",
        ),
        (
            "/v1/dags",
            '{"dag": {"dag": "/dynamic/t", "inputs": {"x": {}}, "nodes": {"a": '
            f'{{"type": "assert", "that": "true"}}}}}}, "inputs": {{"x": "{LONE}"}}}}',
            "the body.inputs.x",
        ),
        (
            "/v1/dags",
            f'{{"dag": {{"dag": "/dynamic/t", "nodes": {{"{LONE}": {{}}}}}}}}',
            "a key in the body.dag.nodes",
        ),
    ],
)
def test_an_unpaired_surrogate_is_a_400_before_anything_runs(
    server: LiveServer, path: str, raw: str, where: str
) -> None:
    runs_before = server.services.dags.runner.runs.list_runs()
    rows_before = len(server.services.usage.rows())
    r = _post(server, path, raw)
    assert r.status_code == 400, r.text
    assert _error(r)["message"].startswith(where) and "surrogate" in _error(r)["message"]
    assert server.services.dags.runner.runs.list_runs() == runs_before  # no run recorded
    assert len(server.services.usage.rows()) == rows_before
    assert httpx.get(server.url + "/v1/dags", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("? [a, b]\n: 1\n", "a key must be a plain value, not a list"),
        ("dag: /dynamic/t\nnodes:\n  ? {x: 1}\n  : {type: llm, prompt: x}\n", "not a dict"),
        ('{"a":' + "[" * 1000 + "]" * 1000 + "}", "JSON document nests too deeply"),
        ("a: " + "[" * 1000 + "]" * 1000 + "\n", "YAML document nests too deeply"),
        ('dag = "/dynamic/x"\na = ' + "[" * 1000 + "]" * 1000 + "\n", "TOML document nests"),
        # a YAML escape inside the JSON string: text for JSON, a lone surrogate for YAML
        (
            'dag: /dynamic/t\ninputs: {s: {type: string, default: "\\ud800"}}\n'
            "nodes: {n: {type: assert, that: 'true'}}\n",
            "inputs.s.default holds an unpaired",
        ),
        # nine levels of ten aliases: 10**9 values once expanded ("billion laughs")
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
                for i in range(8)
            )
            + "dag: /dynamic/t\n",
            "expands to over 1000000 values",
        ),
    ],
)
def test_dag_texts_that_break_the_parsers_are_422(server: LiveServer, text: str, says: str) -> None:
    r = httpx.post(server.url + "/v1/dags", json={"dag": text}, timeout=30)
    assert r.status_code == 422, r.text
    assert says in json.dumps(_error(r)["problems"])


KEY = CompatKey(model_sha256="ab" * 32, type_k="f16", type_v="f16", flash_attn=False)
MAGIC = KVState(KEY, [1], None, b"kv").to_bytes()[:8]  # the format's first bytes


def _state_with_header(header: dict[str, Any] | str, payload: bytes = b"kv") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return b"".join([MAGIC, struct.pack("<I", len(raw)), raw, payload])


def _header(**changes: Any) -> dict[str, Any]:
    header = {
        "key": KEY.model_dump(),
        "tokens": [1, 2],
        "next_token": 3,
        "payload_sha256": hashlib.sha256(b"kv").hexdigest(),
        "payload_bytes": 2,
        "model": MODEL,
    }
    return {**header, **changes}


@pytest.mark.parametrize(
    "header",
    [
        json.dumps(_header()).replace("[1, 2]", "[1e400, 2]"),
        json.dumps(_header()).replace('"next_token": 3', '"next_token": 1e400'),
        json.dumps(_header()).replace('"payload_bytes": 2', '"payload_bytes": 1e400'),
        _header(tokens=[-5, 10**30]),
        _header(next_token=-1),
        _header(tokens=[True]),
        json.dumps(_header()).replace(f'"{MODEL}"', f'"{LONE}"'),
        "[" * 100_000 + "]" * 100_000,
        "[1, 2]",
    ],
)
def test_a_state_with_a_forged_header_is_refused_and_not_stored(
    server: LiveServer, header: dict[str, Any] | str
) -> None:
    before = server.services.blobs.entries()
    r = httpx.put(server.url + "/v1/states", content=_state_with_header(header), timeout=30)
    assert r.status_code == 409 and "header" in _error(r)["message"], r.text
    assert server.services.blobs.entries() == before
    assert httpx.get(server.url + "/v1/states", timeout=10).status_code == 200


def test_the_text_check_reads_the_content_type_as_fastapi_does(server: LiveServer) -> None:
    raw = f'{{"model": "{MODEL}", "prompt": "{LONE}", "max_tokens": 1}}'
    r = httpx.post(
        server.url + "/v1/completions",
        content=raw.encode(),
        timeout=30,
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert r.status_code == 400 and "surrogate" in _error(r)["message"], r.text


def test_malformed_json_names_no_param_and_an_unknown_run_is_not_a_model(
    server: LiveServer,
) -> None:
    r = _post(server, "/v1/chat/completions", '{"model":')
    assert r.status_code == 400 and _error(r)["param"] is None
    missing = httpx.get(server.url + "/v1/dags/nope", timeout=10)
    assert missing.status_code == 404
    assert (_error(missing)["code"], _error(missing)["param"]) == ("not_found", "run_id")
