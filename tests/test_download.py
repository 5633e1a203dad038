"""download(): resume by Range, verify sha256, never a half-written file at the destination.

All against a real HTTP server on 127.0.0.1 (tests/httpserver.py).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pcrt.runtime.errors import DownloadError
from pcrt.runtime.models.download import _host, download, part_path
from tests.httpserver import LocalServer, Resource, sha256_hex

BODY = os.urandom(3 * 1024 * 1024 + 123)  # a few chunks and a ragged end
SHA = sha256_hex(BODY)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(5.0)) as c:
        yield c


def test_plain_download(server: LocalServer, client: httpx.Client, tmp_path: Path) -> None:
    url = server.add_file("/f.bin", BODY)
    seen: list[tuple[int, int | None]] = []
    dest = download(
        client,
        url,
        tmp_path / "f.bin",
        expected_sha256=SHA,
        on_progress=lambda done, total: seen.append((done, total)),
    )
    assert dest.read_bytes() == BODY
    assert not part_path(dest).exists()
    assert seen[0] == (0, len(BODY)) and seen[-1] == (len(BODY), len(BODY))
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
    (request,) = server.seen("/f.bin")
    assert "range" not in request.headers


def test_resume_after_cut_connection(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    cut = 1_000_000
    url = server.add("/f.bin", Resource(body=BODY, cut_after=cut, cuts=1))
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="run the command again to resume"):
        download(client, url, dest, expected_sha256=SHA, retries=0)
    assert not dest.exists()
    assert part_path(dest).stat().st_size == cut

    seen: list[tuple[int, int | None]] = []
    download(client, url, dest, expected_sha256=SHA, on_progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == BODY
    first, second = server.seen("/f.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={cut}-" and second.status == 206
    assert seen[0] == (cut, len(BODY))  # progress starts at the resumed offset


def test_cut_connection_is_resumed_within_one_call(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add("/f.bin", Resource(body=BODY, cut_after=500_000, cuts=2))
    dest = download(client, url, tmp_path / "f.bin", expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    ranges = [r.headers.get("range") for r in server.seen("/f.bin")]
    assert ranges == [None, "bytes=500000-", "bytes=1000000-"]


def test_server_ignoring_range_restarts_from_zero(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add_file("/f.bin", BODY, ranges=False)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"garbage that must not stay in front")
    download(client, url, dest, expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    (request,) = server.seen("/f.bin")
    assert request.headers["range"].startswith("bytes=") and request.status == 200


def test_416_means_the_part_is_complete(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add_file("/f.bin", BODY)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(BODY)
    download(client, url, dest, expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    (request,) = server.seen("/f.bin")
    assert request.status == 416


def test_sha_mismatch_deletes_the_part_and_leaves_no_file(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add_file("/f.bin", BODY)
    dest = tmp_path / "f.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(client, url, dest, expected_sha256=wrong)
    assert f"expected {wrong}, got {SHA}" in str(info.value)
    assert not dest.exists() and not part_path(dest).exists()


def test_corrupt_resumed_prefix_is_caught(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    """The hash covers the resumed prefix too, not only the bytes fetched now."""
    url = server.add_file("/f.bin", BODY)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"X" * 1000)
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(client, url, dest, expected_sha256=SHA)
    assert not dest.exists() and not part_path(dest).exists()


def test_without_sha_a_short_body_is_not_accepted(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add("/f.bin", Resource(body=BODY, cut_after=1000, cuts=5))
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="connection"):
        download(client, url, dest, expected_sha256=None, retries=1)
    assert not dest.exists()
    assert part_path(dest).stat().st_size == 2000


def test_404(server: LocalServer, client: httpx.Client, tmp_path: Path) -> None:
    url = server.url + "/missing.bin"
    with pytest.raises(DownloadError, match=rf"^HTTP 404 for {url} \(not found\)$") as info:
        download(client, url, tmp_path / "x", expected_sha256=None)
    assert info.value.status == 404
    assert not (tmp_path / "x").exists()


def test_401(server: LocalServer, client: httpx.Client, tmp_path: Path) -> None:
    url = server.add_file("/private.bin", BODY, require_token="s3cret")
    with pytest.raises(DownloadError, match="HTTP 401 .*authentication required"):
        download(client, url, tmp_path / "x", expected_sha256=None)
    dest = download(
        client,
        url,
        tmp_path / "x",
        expected_sha256=SHA,
        headers={"Authorization": "Bearer s3cret"},
    )
    assert dest.read_bytes() == BODY


def test_redirect_is_followed(server: LocalServer, client: httpx.Client, tmp_path: Path) -> None:
    url = server.add_hf_file("o/r", "f.bin", BODY)
    download(client, url, tmp_path / "f.bin", expected_sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_connection_refused(client: httpx.Client, tmp_path: Path) -> None:
    with LocalServer() as srv:
        url = srv.url + "/f.bin"
    with pytest.raises(DownloadError, match="cannot connect"):
        download(client, url, tmp_path / "x", expected_sha256=None)


def test_timeout(server: LocalServer, tmp_path: Path) -> None:
    url = server.add_file("/slow.bin", BODY, delay=1.0)
    with (
        httpx.Client(timeout=httpx.Timeout(0.2)) as client,
        pytest.raises(DownloadError, match="timed out"),
    ):
        download(client, url, tmp_path / "x", expected_sha256=None, retries=0)
    assert not (tmp_path / "x").exists()


def test_existing_destination_is_replaced_atomically(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add_file("/f.bin", BODY)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError):
        download(client, url, dest, expected_sha256="1" * 64)
    assert dest.read_bytes() == b"old"  # a failed download never touches the destination
    download(client, url, dest, expected_sha256=SHA)
    assert dest.read_bytes() == BODY


def test_concurrent_downloads_of_one_file(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    """No lock: each writer has its own temp name; all finish with the verified file."""
    url = server.add_file("/f.bin", BODY, chunk_delay=0.002)
    dest = tmp_path / "f.bin"
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            download(client, url, dest, expected_sha256=SHA)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dest.read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_prefix_of_a_killed_download_is_adopted(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    url = server.add_file("/f.bin", BODY)
    dead_pid = _a_dead_pid()
    orphan = tmp_path / f".f.bin.pcrt-{_host()}-{dead_pid}-1.part"
    orphan.write_bytes(BODY[:700_000])
    alive = tmp_path / f".f.bin.pcrt-{_host()}-{os.getppid()}-1.part"
    alive.write_bytes(BODY[:900_000])  # a running download: never touched
    download(client, url, tmp_path / "f.bin", expected_sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == BODY
    (request,) = server.seen("/f.bin")
    assert request.headers["range"] == "bytes=700000-"
    assert not orphan.exists()
    assert alive.read_bytes() == BODY[:900_000]


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
