"""``pcrt usage``: what each agent asked for, from the store's usage rows."""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

import click

from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.paths import Paths

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["usage", "usage_table"]


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
    console = Console()
    console.print(usage_table(rows, console.width))


def usage_table(rows: list[dict[str, Any]], width: int) -> Table:
    """One line per agent and model in ``width`` columns (80 included): the counts keep
    their width, the names are cut to what is left (...), and the error and peer
    columns show only when a row has one."""
    from rich.table import Table

    counts = [("REQ", "requests")]
    counts += [(title, key) for title, key in _RARE if any(r[key] for r in rows)]
    counts += [("PROMPT", "prompt_tokens"), ("CACHED", "cached_tokens")]
    counts += [("OUT", "completion_tokens")]
    lines = [
        [
            *(str(r[key]) for _, key in counts),
            f"{r['avg_ttft_ms']:.0f} ms" if r["avg_ttft_ms"] is not None else "-",
            str(r["last"])[5:16].replace("T", " "),  # month, day, to the minute
        ]
        for r in rows
    ]
    titles = [title for title, _ in counts] + ["TTFT", "LAST"]
    widths = [max(len(t), *(len(line[i]) for line in lines)) for i, t in enumerate(titles)]
    room = max(12, width - sum(widths) - 2 * (len(titles) + 2))  # two spaces a column
    agent_width = max(5, min(max(len(r["agent"]) for r in rows), room * 3 // 5))
    model_width = max(5, room - agent_width)
    table = Table(box=None, header_style="bold", padding=(0, 2, 0, 0))
    table.add_column("AGENT", no_wrap=True)
    table.add_column("MODEL", no_wrap=True)
    for title in titles:
        table.add_column(title, justify="right", no_wrap=True)
    for r, line in zip(rows, lines, strict=True):
        table.add_row(_cut(r["agent"], agent_width), _cut(r["model"], model_width), *line)
    return table


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# columns most rows leave at 0: shown only when one does not
_RARE = (("ERR", "errors"), ("PEERS", "on_peers"), ("FELL BACK", "fell_back"))
