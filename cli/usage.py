"""``pcrt usage``: what each agent asked for, from the store's usage rows."""

from __future__ import annotations

import datetime
import json

import click

from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.paths import Paths

__all__ = ["usage"]


def _since(value: str | None) -> str | None:
    """An ISO date/time, or a duration back from now (90m, 24h)."""
    if value is None:
        return None
    try:
        return datetime.datetime.fromisoformat(value).isoformat()
    except ValueError:
        pass
    from pcrt.runtime.server.settings import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError:
        raise InvalidRequest(
            f"--since takes a date (2026-11-01) or a duration (24h): {value!r}"
        ) from None
    moment = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    return moment.isoformat(timespec="microseconds")  # as the store writes them


@click.command()
@click.option("--agent", default=None, help="Only this agent.")
@click.option("--since", default=None, help="A date (2026-11-01) or a duration back (24h).")
@click.option("--json", "as_json", is_flag=True)
def usage(agent: str | None, since: str | None, as_json: bool) -> None:
    """Summarise requests and tokens per agent and model."""
    from rich.console import Console
    from rich.table import Table

    from pcrt.cache.store import Store
    from pcrt.cache.usage import UsageLog

    paths = Paths.from_env()
    with Store(paths.db_path) as store:
        rows = UsageLog(store).summary(agent=agent, since=_since(since))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no usage recorded")
        return
    table = Table(box=None, header_style="bold")
    for column in (
        "AGENT",
        "MODEL",
        "REQUESTS",
        "ERRORS",
        "ON PEERS",
        "FELL BACK",
        "PROMPT",
        "CACHED",
        "COMPLETION",
        "AVG TTFT",
        "LAST",
    ):
        table.add_column(column, overflow="fold")
    for r in rows:
        ttft = f"{r['avg_ttft_ms']:.0f} ms" if r["avg_ttft_ms"] is not None else "-"
        table.add_row(
            r["agent"],
            r["model"],
            str(r["requests"]),
            str(r["errors"]),
            str(r["on_peers"]),
            str(r["fell_back"]),
            str(r["prompt_tokens"]),
            str(r["cached_tokens"]),
            str(r["completion_tokens"]),
            ttft,
            r["last"][:19],
        )
    Console().print(table)
