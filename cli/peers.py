"""``pcrt peers``: the daemon's peer table."""

from __future__ import annotations

import json
import time

import click

__all__ = ["peers"]


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _speed(rates: dict[str, float]) -> str:
    return ", ".join(f"{v:.0f}" for v in rates.values()) or "-"


@click.command()
@click.option("--json", "as_json", is_flag=True)
def peers(as_json: bool) -> None:
    """Show the peers a running daemon knows: trust, health, models, speed, load."""
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        data = client.get("/v1/pcrt/peers")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console  # only once there is something to show
    from rich.table import Table

    console = Console()
    node = data["node"]
    lan = "mDNS on" if node["lan"] else "mDNS off"
    key = "cluster key set" if node["cluster_key"] else "no cluster key"
    console.print(f"this node: {node['name']} ({node['node_id']}), {lan}, {key}")
    if not data["peers"]:
        console.print("no peers")
        return
    table = Table(box=None, header_style="bold")
    columns = (
        "NAME",
        "ADDRESS",
        "KIND",
        "TRUSTED",
        "HEALTH",
        "MODELS",
        "LATENCY",
        "TOK/S",
        "QUEUE",
        "LAST SEEN",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for p in data["peers"]:
        trusted = "yes" if p["trusted"] else f"no ({p['trust']})"
        health = p["health"] + (f" {p['cooldown_s']:.0f}s" if p["health"] == "cooldown" else "")
        latency = "-" if p["latency_ms"] is None else f"{p['latency_ms']:.1f} ms"
        table.add_row(
            p["name"],
            p["url"],
            p["kind"],
            trusted,
            health,
            ", ".join(p["models"]) or "-",
            latency,
            _speed(p["tokens_per_s"]),
            str(p["queue_depth"]),
            _ago(p["last_seen"]),
        )
    console.print(table)
