"""``pcrt state``: the local store's KV state blobs, without a daemon.

``list``, ``export ID FILE``, ``import FILE`` and ``rm ID`` open the store under
``PCRT_HOME`` directly, so states can be moved by hand (a USB stick, scp) even when no
daemon runs. An ID may be any unique prefix of the sha256 that ``list`` shows.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pcrt.device.units import format_bytes
from pcrt.runtime.errors import StateError
from pcrt.runtime.paths import Paths

if TYPE_CHECKING:
    from pcrt.cache.blobs import BlobStore
    from pcrt.runtime.engine.state import StateHeader

__all__ = ["state"]

_PREFIX = re.compile(r"^[0-9a-f]{4,64}$")
_SHOWN = 12  # id characters shown by `list`


@contextlib.contextmanager
def _blobs() -> Iterator[BlobStore]:
    from pcrt.cache.blobs import BlobStore
    from pcrt.cache.store import Store

    paths = Paths.from_env()
    with Store(paths.db_path) as store:
        yield BlobStore(store, paths.home / "blobs")


def _resolve(blobs: BlobStore, given: str) -> str:
    """The full sha256 for an id or a unique prefix of one."""
    prefix = given.strip().lower()
    if not _PREFIX.match(prefix):
        raise StateError(f"not a state id: {given!r} (4 to 64 hex digits; see `pcrt state list`)")
    matches = [i.sha256 for i in blobs.entries() if i.sha256.startswith(prefix)]
    matches = [sha for sha in matches if blobs.has(sha)]
    if not matches:
        raise StateError(f"no state {given!r} (see `pcrt state list`)")
    if len(matches) > 1:
        raise StateError(f"{given!r} matches {len(matches)} states; give more of the id")
    return matches[0]


def _header(blobs: BlobStore, sha256: str) -> StateHeader | None:
    from pcrt.runtime.engine.state import KVState

    try:
        return KVState.read_header(blobs.path_of(sha256))
    except (StateError, OSError):
        return None


@click.group()
def state() -> None:
    """KV states in the local store: list, export, import, remove."""


@state.command("list")
@click.option("--run", "run_id", default=None, help="Only the states of this DAG run.")
@click.option("--json", "as_json", is_flag=True)
def list_states(run_id: str | None, as_json: bool) -> None:
    """List stored states, oldest first."""
    from rich.console import Console
    from rich.table import Table

    from pcrt.runtime.engine.state import describe_state

    with _blobs() as blobs:
        rows = [
            (info, _header(blobs, info.sha256))
            for info in blobs.entries(run_id=run_id)
            if blobs.has(info.sha256)
        ]
    if as_json:
        data = [describe_state(info, header) for info, header in rows]
        click.echo(json.dumps(data, indent=2))
        return
    if not rows:
        click.echo("no states stored")
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "SIZE", "TOKENS", "MODEL", "RUN", "LAST USED"):
        table.add_column(column, overflow="fold")
    for info, header in rows:
        table.add_row(
            info.sha256[:_SHOWN],
            format_bytes(info.size),
            str(header.n_tokens) if header else "unreadable",
            (header.model or "-") if header else "-",
            info.run_id or "-",
            info.last_used_at[:19],
        )
    Console().print(table)


@state.command("export")
@click.argument("state_id", metavar="ID")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def export(state_id: str, file: Path) -> None:
    """Write state ID to FILE (atomically: FILE is complete or untouched)."""
    from pcrt.cache.blobs import BlobCorrupt, BlobMissing, write_atomically
    from pcrt.runtime.engine.state import KVState, is_chunked_blob

    with _blobs() as blobs:
        sha256 = _resolve(blobs, state_id)
        try:
            data = blobs.get(sha256)
        except BlobMissing:
            raise StateError(f"no state {state_id!r} (see `pcrt state list`)") from None
        except BlobCorrupt as exc:
            raise StateError(str(exc)) from None
    if is_chunked_blob(data):  # its KV is in the chunk store: joined into a whole state
        data = _whole(data)
    header = KVState.read_header(data)
    try:
        write_atomically(file.expanduser(), data)
    except OSError as exc:
        raise StateError(f"cannot write {file}: {exc.strerror or exc}") from None
    click.echo(
        f"wrote {file} ({format_bytes(len(data))}, {header.n_tokens} tokens, state {sha256})"
    )


def _whole(data: bytes) -> bytes:
    """A chunked state's blob as a whole state's, from the chunk store under the home."""
    from pcrt.cache.chunks import ChunkStore
    from pcrt.cache.store import Store
    from pcrt.runtime.engine.chunk_cache import whole_state
    from pcrt.runtime.engine.state import ChunkedState

    paths = Paths.from_env()
    with Store(paths.db_path) as store:
        chunks = ChunkStore(store, paths.home / "chunks", ram_bytes=0, disk_bytes=1 << 62)
        try:
            return whole_state(ChunkedState.from_bytes(data), chunks).to_bytes()
        finally:
            chunks.close()


@state.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def import_(file: Path) -> None:
    """Verify FILE as a KV state and store it; prints its id."""
    from pcrt.runtime.engine.state import KVState

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        KVState.from_bytes(data)
    except StateError as exc:
        raise StateError(f"{file}: {exc}") from None
    with _blobs() as blobs:
        sha256 = blobs.put(data)
    click.echo(sha256)


@state.command("rm")
@click.argument("state_id", metavar="ID")
def rm(state_id: str) -> None:
    """Remove state ID from the store."""
    with _blobs() as blobs:
        sha256 = _resolve(blobs, state_id)
        blobs.remove(sha256)
    click.echo(f"removed {sha256}")
