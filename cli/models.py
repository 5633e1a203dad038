"""``pcrt models``: list, show, pull and remove models."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from pcrt.device.units import format_bytes

if TYPE_CHECKING:
    from rich.console import Console

    from pcrt.runtime.models.gguf_info import GgufInfo
    from pcrt.runtime.models.registry import ModelEntry, Registry

__all__ = ["models"]


@click.group()
def models() -> None:
    """List, inspect, pull and remove models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_models(as_json: bool) -> None:
    """List the configured models and whether they are pulled."""
    from rich.table import Table

    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    rows = [_summary(registry, entry) for entry in registry.entries.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ALIASES", "TAGS", "SOURCE", "PULLED", "SIZE", "CONTEXT"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["name"] + (" *" if row["default"] else ""),
            ", ".join(row["aliases"]),
            ", ".join(row["tags"]),
            row["source"],
            "yes" if row["pulled"] else "no",
            format_bytes(row["size"]) if row["size"] is not None else "-",
            str(row["context"]),
        )
    _console().print(table)


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(name: str, as_json: bool) -> None:
    """Show a model's configuration, GGUF metadata and sha256."""
    from rich.table import Table

    from pcrt.cache.store import Store
    from pcrt.runtime.models.gguf_info import read_gguf_info
    from pcrt.runtime.models.hashing import file_sha256
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    entry = registry.resolve(name)
    path = registry.path_of(entry)
    info: GgufInfo | None = None
    sha256: str | None = None
    pulled = path.is_file()
    if pulled:
        info = read_gguf_info(path)
        with Store(registry.paths.db_path) as store:
            sha256 = file_sha256(path, store)
    data: dict[str, Any] = {
        **_summary(registry, entry),
        "description": entry.description,
        "sha256": sha256,
        "sha256_expected": entry.sha256,
        "sha256_ok": None if sha256 is None or entry.sha256 is None else sha256 == entry.sha256,
        "gguf": info.model_dump(mode="json") if info else None,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("name", entry.name + (" (default)" if data["default"] else ""))
    for key in ("description", "source", "path"):
        if data[key]:
            table.add_row(key, str(data[key]))
    if entry.aliases:
        table.add_row("aliases", ", ".join(entry.aliases))
    if entry.tags:
        table.add_row("tags", ", ".join(entry.tags))
    table.add_row("context (configured)", str(entry.context))
    if not pulled:
        table.add_row("pulled", f"no (run: pcrt models pull {entry.name})")
        _console().print(table)
        return
    assert info is not None and sha256 is not None
    check = {True: "verified", False: f"MISMATCH, expected {entry.sha256}", None: "no sha256 set"}
    table.add_row("sha256", f"{sha256} ({check[data['sha256_ok']]})")
    table.add_row("size", format_bytes(info.file_size))
    table.add_row("architecture", info.architecture)
    if info.name:
        table.add_row("model name", info.name)
    table.add_row("parameters", f"{info.parameter_count:,}")
    table.add_row("quantisation", info.file_type or "?")
    table.add_row(
        "tensor types",
        ", ".join(f"{kind} x{n}" for kind, n in sorted(info.tensor_types.items())),
    )
    for label, value in (
        ("layers", info.block_count),
        ("context length (trained)", info.context_length),
        ("embedding size", info.embedding_length),
        ("heads", info.head_count),
        ("KV heads", info.head_count_kv),
        ("head dim (K/V)", _pair(info.key_length, info.value_length)),
        ("vocab size", info.vocab_size),
    ):
        if value is not None:
            table.add_row(label, str(value))
    table.add_row("chat template", "yes" if info.has_chat_template else "no")
    _console().print(table)


@models.command("pull")
@click.argument("name")
def pull(name: str) -> None:
    """Download a model (resumable; verified by sha256)."""
    from pcrt.cache.store import Store
    from pcrt.cli.progress import download_progress
    from pcrt.runtime.models.pull import ensure_pulled, is_present
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    entry = registry.resolve(name)
    with Store(registry.paths.db_path) as store:
        already = is_present(entry, registry.paths, store)
        path = ensure_pulled(entry, registry, progress=download_progress, store=store)
    if already:
        click.echo(f"{entry.name} is already pulled: {path}")
    else:
        click.echo(f"pulled {entry.name}: {path}")


@models.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Delete a pulled model file (never a local file you configured yourself)."""
    from pcrt.cache.store import Store
    from pcrt.runtime.models.pull import remove
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    entry = registry.resolve(name)
    with Store(registry.paths.db_path) as store:
        removed = remove(entry, registry.paths, store)
    if not removed:
        click.echo(f"{entry.name} is not pulled: nothing to remove")
        return
    for path in removed:
        click.echo(f"removed {path}")


def _summary(registry: Registry, entry: ModelEntry) -> dict[str, Any]:
    from pcrt.runtime.models.registry import LocalSource

    path = registry.path_of(entry)
    pulled = path.is_file()
    return {
        "name": entry.name,
        "default": entry.name == registry.resolve(None).name,
        "aliases": list(entry.aliases),
        "tags": list(entry.tags),
        "source": str(entry.source),
        "local": isinstance(entry.source, LocalSource),
        "path": str(path),
        "pulled": pulled,
        "size": path.stat().st_size if pulled else None,
        "context": entry.context,
    }


def _console() -> Console:
    from rich.console import Console

    console = Console()
    # piped output keeps one row per line instead of folding at 80 columns
    return console if console.is_terminal else Console(width=250)


def _pair(a: int | None, b: int | None) -> str | None:
    if a is None and b is None:
        return None
    return f"{a if a is not None else '?'}/{b if b is not None else '?'}"
