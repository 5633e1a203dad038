"""``pcrt ps`` and ``pcrt stop``: the daemon's loaded models."""

from __future__ import annotations

import json
import time

import click

from pcrt.device.units import format_bytes

__all__ = ["ps", "stop"]


def _until(expires_at: float | None, in_flight: int) -> str:
    if in_flight:
        return "busy"
    if expires_at is None:
        return "forever"
    left = max(0.0, expires_at - time.time())
    return f"{int(left // 60)}m{int(left % 60):02d}s"


@click.command()
@click.option("--json", "as_json", is_flag=True)
def ps(as_json: bool) -> None:
    """Show the models a running daemon has loaded."""
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        data = client.get("/v1/pcrt/ps")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console  # only once there is something to show
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "WEIGHTS", "KV CACHE", "SLOTS", "QUEUE", "CONTEXT", "UNTIL"):
        table.add_column(column, overflow="fold")
    for m in data["models"]:
        table.add_row(
            m["name"],
            format_bytes(m["size_bytes"]),
            format_bytes(m["kv_bytes"]),
            f"{m['busy_slots']}/{m['parallel']}",
            str(m["queue_depth"]),
            str(m["context"]),
            _until(m["expires_at"], m["in_flight"]),
        )
    console = Console()
    if data["models"]:
        console.print(table)
    else:
        console.print("no models loaded")
    for m in data["models"]:
        if not m.get("kv_chunks", "on").startswith("on"):  # whole states: say why
            console.print(f"{m['name']}: KV chunk store {m['kv_chunks']}")
    console.print(f"daemon memory (RSS): {format_bytes(data['process_rss_bytes'])}")


@click.command()
@click.argument("model")
def stop(model: str) -> None:
    """Unload MODEL from a running daemon now."""
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        result = client.post("/v1/pcrt/stop", {"model": model})
    click.echo(f"unloaded {model}" if result["unloaded"] else f"{model} was not loaded")
