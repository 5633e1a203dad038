"""Resumable, verified HTTP downloads.

Model files are large and links are slow, so a download keeps what it received in
``DEST.part`` when it fails, picks up from there next time (``Range: bytes=N-``), checks the
sha256 of the whole file (the resumed prefix included) and only then renames it onto
``DEST``. A file at ``DEST`` is therefore always complete and verified; a failure or crash
leaves at most a partial file beside it. While a download runs, it writes under a name of
its own (see ``_claim``), so concurrent downloads of one file need no lock.

Server answers to a range request:

- ``206``: append the rest to the ``.part``;
- ``200``: the server ignored the range, so start again from zero;
- ``416``: the ``.part`` already holds the whole file: verify it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import httpx

from pcrt.runtime.errors import DownloadError

__all__ = ["CHUNK", "ProgressCallback", "download", "fsync_dir", "part_path"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Bytes per read when hashing or copying: 1 MiB."""

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None when the server does not say)."""

_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


def part_path(dest: Path) -> Path:
    """Where an interrupted download of ``dest`` waits to be resumed."""
    return dest.with_name(dest.name + ".part")


def download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    expected_sha256: str | None,
    on_progress: ProgressCallback | None = None,
    headers: dict[str, str] | None = None,
    retries: int = 3,
) -> Path:
    """Fetch ``url`` into ``dest``; resume a ``.part`` left by an earlier attempt.

    A connection that drops mid-stream is resumed up to ``retries`` times before the error
    is raised; the bytes received stay in ``DEST.part``, so a later call resumes too.
    Raises ``DownloadError`` for HTTP errors, network errors, a short body and a sha256
    mismatch (which also deletes the partial file: resuming it would give the same bytes).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        active = _claim(dest)
    except OSError as exc:
        raise DownloadError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from None
    expected = expected_sha256.lower() if expected_sha256 else None
    attempt = 0
    try:
        while True:
            try:
                digest = _fetch(client, url, active, headers or {}, on_progress)
                break
            except _Retryable as exc:
                attempt += 1
                if attempt > retries:
                    size = active.stat().st_size if active.exists() else 0
                    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                    kept = (
                        f"; the {size} bytes received are kept: run the command again to resume"
                        if size
                        else ""
                    )
                    raise DownloadError(f"download failed ({tries}): {exc}{kept}") from None
                delay = min(0.2 * 2 ** (attempt - 1), 5.0)
                log.warning(
                    "%s; resuming in %.1fs (attempt %d of %d)", exc, delay, attempt, retries
                )
                time.sleep(delay)
        if expected is not None and digest != expected:
            active.unlink(missing_ok=True)
            raise DownloadError(
                f"sha256 mismatch for {url}: expected {expected}, got {digest} (download deleted)"
            )
        try:
            os.replace(active, dest)
        except OSError as exc:
            raise DownloadError(f"cannot move the download to {dest}: {exc.strerror}") from None
    except BaseException:
        _park(active, dest)
        raise
    fsync_dir(dest.parent)
    return dest


# -- sharing the resumable prefix without a lock ------------------------------------------
#
# A download writes under a name that only its own thread uses (host, pid and thread id in
# it), so concurrent downloads of one file never write into the same file. The prefix
# waits between attempts under DEST.part ("parked"); an attempt takes it over by an atomic
# rename, so at most one writer can get it, and parks what it has when it fails. A writer
# that died without parking (killed) leaves its file under its own name: a later attempt
# adopts it when that process is gone. Racing writers can at worst lose resumable
# progress; every finished file is verified, and only a verified one reaches DEST.

_ACTIVE = re.compile(r"\.pcrt-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<tid>\d+)\.part$")


def _active_name(dest: Path) -> Path:
    me = f"{_host()}-{os.getpid()}-{threading.get_native_id()}"
    return dest.with_name(f".{dest.name}.pcrt-{me}.part")


def _claim(dest: Path) -> Path:
    """Our writing name, holding the longest resumable prefix we could take over."""
    mine = _active_name(dest)
    candidates = [part_path(dest)]
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.pcrt-*.part"):
        if path != mine and _abandoned(path):
            candidates.append(path)
    sizes = []
    for path in candidates:
        with contextlib.suppress(OSError):
            sizes.append((path.stat().st_size, path))
    have = mine.stat().st_size if mine.exists() else -1
    for size, path in sorted(sizes, key=lambda pair: pair[0], reverse=True):
        if size <= have:
            break
        try:
            os.replace(path, mine)  # atomic: if another writer took it first, this fails
        except FileNotFoundError:
            continue
        log.info("resuming %s from %d bytes left by an earlier attempt", dest.name, size)
        break
    for _size, path in sizes:  # abandoned attempts not taken over are only clutter
        if path != part_path(dest) and path.exists() and path != mine:
            with contextlib.suppress(OSError):
                path.unlink()
    return mine


def _park(active: Path, dest: Path) -> None:
    """Leave the prefix under ``DEST.part`` for the next attempt (unless a longer one is)."""
    try:
        size = active.stat().st_size
    except OSError:
        return
    part = part_path(dest)
    try:
        if size == 0 or (part.exists() and part.stat().st_size >= size):
            active.unlink()
        else:
            os.replace(active, part)
    except OSError as exc:
        log.warning("could not keep the partial download %s: %s", active, exc)


def _abandoned(path: Path) -> bool:
    """Whether the writer named in ``path`` is gone (only decidable for this host)."""
    m = _ACTIVE.search(path.name)
    if m is None or m["host"] != _host():
        return False
    pid, tid = int(m["pid"]), int(m["tid"])
    if pid == os.getpid():
        return tid not in {t.native_id for t in threading.enumerate()}
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


class _Retryable(Exception):
    """A transient failure after which resuming makes sense."""


def _fetch(
    client: httpx.Client,
    url: str,
    part: Path,
    headers: dict[str, str],
    on_progress: ProgressCallback | None,
) -> str:
    """One attempt: bring ``part`` to the full file; return the sha256 of its content."""
    offset = part.stat().st_size if part.exists() else 0
    request_headers = {**headers, "Accept-Encoding": "identity"}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    try:
        with client.stream("GET", url, headers=request_headers, follow_redirects=True) as resp:
            status = resp.status_code
            if status == 416 and offset:
                total = _parse_content_range(resp.headers.get("content-range"))[2]
                if total is not None and total != offset:
                    # the .part is longer than the file: it cannot be a prefix of it
                    log.warning("%s is %d bytes, the file %d: restarting", part, offset, total)
                    part.unlink()
                    raise _Retryable(f"stale partial download of {url}")
                log.info("%s is already complete (%d bytes)", part, offset)
                if on_progress:
                    on_progress(offset, offset)
                return _hash_file(part)
            if status >= 400:
                raise DownloadError(_http_error(status, url), status=status)
            if status == 206:
                start, _end, total = _parse_content_range(resp.headers.get("content-range"))
                if start != offset:
                    log.warning("server resumed %s at %s, not %d: restarting", url, start, offset)
                    part.unlink()
                    raise _Retryable(f"server sent the wrong range for {url}")
                mode = "ab"
            elif status == 200:
                if offset:
                    log.info("server ignored the range request for %s: restarting", url)
                offset = 0
                length = resp.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                mode = "wb"
            else:
                raise DownloadError(f"HTTP {status} for {url}: unexpected answer")
            with part.open(mode) as out:
                hasher = _hash_prefix(part, offset)
                done = offset
                if on_progress:
                    on_progress(done, total)
                for chunk in resp.iter_raw():  # unbuffered: a cut keeps every byte received
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if on_progress:
                        on_progress(done, total)
                out.flush()
                os.fsync(out.fileno())
            if total is not None and done != total:
                raise _Retryable(f"connection closed at {done} of {total} bytes of {url}")
            return hasher.hexdigest()
    except httpx.TimeoutException as exc:
        raise _Retryable(f"timed out fetching {url} ({type(exc).__name__})") from None
    except httpx.ConnectError as exc:
        raise DownloadError(f"cannot connect to fetch {url}: {exc}") from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise _Retryable(f"connection broken while fetching {url}: {exc}") from None
    except httpx.TooManyRedirects:
        raise DownloadError(f"too many redirects fetching {url}") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"fetching {url} failed: {exc}") from None
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None


def _http_error(status: int, url: str) -> str:
    hint = {
        401: " (authentication required)",
        403: " (access denied)",
        404: " (not found)",
        429: " (rate limited: try again later)",
    }.get(status, "")
    return f"HTTP {status} for {url}{hint}"


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 99, 100); unknown parts are None."""
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        return None, None, None
    start = int(m[1]) if m[1] is not None else None
    end = int(m[2]) if m[2] is not None else None
    total = int(m[3]) if m[3] != "*" else None
    return start, end, total


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    """A sha256 already fed with the first ``length`` bytes of ``path``."""
    hasher = hashlib.sha256()
    if length:
        with path.open("rb") as f:
            _feed(hasher, f, length)
    return hasher


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        _feed(hasher, f, None)
    return hasher.hexdigest()


def _feed(hasher: hashlib._Hash, f: BinaryIO, limit: int | None) -> None:
    remaining = limit
    while remaining is None or remaining > 0:
        chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
        if not chunk:
            break
        hasher.update(chunk)
        if remaining is not None:
            remaining -= len(chunk)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
