"""``pcrt cache``: the KV chunk store's tiers and what they saved; ``pcrt cache clear``.

With a daemon running it asks the daemon (whose RAM tier and counters live in its
process); without one it reads the disk tier under the home dir.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from pcrt.device.units import format_bytes

__all__ = ["cache"]


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cache(ctx: click.Context, as_json: bool) -> None:
    """Show the KV chunk store: bytes and chunks per tier, hit rate, tokens saved."""
    if ctx.invoked_subcommand is not None:
        return
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        if client.is_up():
            data = client.get("/v1/pcrt/cache")
        else:
            with _local_store() as chunks:
                stats = chunks.stats().as_dict()
            data = {"enabled": True, "store": stats, "models": {}, "daemon": False}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _show(data)


@cache.command()
def clear() -> None:
    """Empty both tiers (chunks an unfinished run needs stay)."""
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        if client.is_up():
            result = client.delete("/v1/pcrt/cache")
            entries, size = result["cleared_chunks"], result["cleared_bytes"]
        else:
            with _local_store() as chunks:
                entries, size = chunks.clear()
    click.echo(f"cleared {entries} chunks ({format_bytes(size)})")


def _show(data: dict[str, Any]) -> None:
    store = data["store"]
    if not data["enabled"] or store is None:
        click.echo("the KV chunk store is off (kv_ram_bytes and kv_disk_bytes are 0)")
        return
    ram = f"{format_bytes(store['ram_bytes'])} of {format_bytes(store['ram_limit'])}"
    disk = f"{format_bytes(store['disk_bytes'])} of {format_bytes(store['disk_limit'])}"
    lines = [
        f"chunks of {store['chunk_tokens']} tokens",
        f"RAM   {ram}, {store['ram_entries']} chunks",
        f"disk  {disk}, {store['disk_entries']} chunks ({store['pinned']} pinned)",
    ]
    if data.get("daemon", True):
        lines.append(
            f"hits  {store['hits']} of {store['hits'] + store['misses']} chunks"
            f" ({store['hit_rate']:.0%}), {store['tokens_saved']} prompt tokens not"
            f" computed, {format_bytes(store['bytes_restored'])} restored"
        )
        if store["refused"]:
            lines.append(f"refused {store['refused']} corrupt chunks (recomputed)")
    else:
        lines.append("no daemon running: hit counters live in a daemon")
    for model, status in data["models"].items():
        lines.append(f"{model}: {status}")
    click.echo("\n".join(lines))


@contextmanager
def _local_store() -> Iterator[Any]:
    from pcrt.cache.chunks import ChunkStore
    from pcrt.cache.store import Store
    from pcrt.runtime.paths import Paths
    from pcrt.runtime.server.settings import ServerSettings

    settings = ServerSettings.load()
    paths = Paths.from_env()
    with Store(paths.db_path) as store:
        chunks = ChunkStore(
            store,
            paths.home / "chunks",
            ram_bytes=0,
            disk_bytes=max(1, settings.kv_disk_bytes),
            chunk_tokens=settings.kv_chunk_tokens,
        )
        try:
            yield chunks
        finally:
            chunks.close()
