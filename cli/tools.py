"""``pcrt tools list`` and ``pcrt tools call``: the tool registry (``[tools]`` in the
daemon's config).

Through the running daemon when one answers (its MCP sessions are open already, and its
metrics count the call); else in this process, from the config file: the registry is
built, used once and closed, MCP servers and all. Either way the agent is
``--agent`` (X-PC-Agent-ID), or "anonymous" as the daemon names a caller without one,
so both paths apply the same permissions.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pcrt.runtime.errors import InvalidRequest

if TYPE_CHECKING:  # imported where they run: httpx and the registry are not light
    from pcrt.cli.client import DaemonClient
    from pcrt.runtime.tools import ToolRegistry

__all__ = ["tools"]

_ANONYMOUS = "anonymous"  # the daemon's name for a caller without X-PC-Agent-ID
_CONFIG = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The daemon's config file, when no daemon runs (default: PCRT_CONFIG or the "
    "user config dir's config.toml).",
)


@click.group()
def tools() -> None:
    """The tools agents call: list them, call one."""


@tools.command("list")
@click.option("--agent", default=None, help="Whose permissions `allowed` reflects.")
@_CONFIG
@click.option("--json", "as_json", is_flag=True)
def list_tools(agent: str | None, config_file: Path | None, as_json: bool) -> None:
    """Show every tool (kind, source, idempotent, which agents may call it) and the
    problems met starting them."""

    async def describe(registry: ToolRegistry, who: str) -> dict[str, Any]:
        return registry.describe(who)

    data, where = _ask(
        lambda client, headers: client.get("/v1/pcrt/tools", headers=headers),
        describe,
        agent,
        config_file,
    )
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console  # only once there is something to show
    from rich.table import Table

    console = Console()
    console.print(f"tools {where}")
    if data["tools"]:
        table = Table(box=None, header_style="bold")
        for column in ("NAME", "KIND", "SOURCE", "IDEMPOTENT", "TIMEOUT", "AGENTS"):
            table.add_column(column, overflow="fold")
        for t in data["tools"]:
            table.add_row(
                t["name"],
                t["kind"],
                t["source"],
                "yes" if t["idempotent"] else "no",
                f"{t['timeout']:g}s",
                _agents(t["agents"]),
            )
        console.print(table)
    else:
        console.print("no tools")
    for p in data["problems"]:
        what = f"{p['kind']} {p['source']}" + (f" tool {p['tool']}" if p["tool"] else "")
        console.print(f"[red]problem[/red]: {what}: {p['error']}", markup=True, highlight=False)


@tools.command("call")
@click.argument("name")
@click.option("--args", "arguments", default="{}", show_default=True, help="A JSON object.")
@click.option("--agent", default=None, help="Call as this agent (X-PC-Agent-ID).")
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def call_tool(
    name: str, arguments: str, agent: str | None, config_file: Path | None, as_json: bool
) -> None:
    """Call tool NAME with --args; print what it answered (exit 1 if it failed)."""
    try:
        parsed = json.loads(arguments)
    except ValueError as exc:
        raise InvalidRequest(f"--args is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest('--args must be a JSON object, like \'{"city": "Oslo"}\'')

    async def call(registry: ToolRegistry, who: str) -> dict[str, Any]:
        result = await registry.call(name, parsed, agent=who)
        return {"tool": name, **result.to_dict()}

    result, _ = _ask(
        lambda client, headers: client.post(
            f"/v1/pcrt/tools/{name}/call", {"arguments": parsed}, headers=headers
        ),
        call,
        agent,
        config_file,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
    elif result["ok"]:
        click.echo(result["text"])
    else:
        click.secho(f"tool failed: {result['error']}", fg="red", err=True)
    if not result["ok"]:
        raise SystemExit(1)


def _ask(
    remote: Callable[[DaemonClient, dict[str, str] | None], Any],
    local: Callable[[ToolRegistry, str], Awaitable[Any]],
    agent: str | None,
    config_file: Path | None,
) -> tuple[Any, str]:
    """(the answer, where it came from): ``remote(client, headers)`` on the running
    daemon, else ``await local(registry, agent)`` on a registry built here."""
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        if client.is_up():
            from pcrt.routing.forward import AGENT_HEADER

            headers = {AGENT_HEADER: agent} if agent else None
            return remote(client, headers), f"of the daemon at {client.url}"
    import asyncio

    from pcrt.runtime.server.settings import ServerSettings
    from pcrt.runtime.tools import ToolRegistry

    settings = ServerSettings.load(config_file)

    async def run() -> Any:
        async with ToolRegistry(settings.tools) as registry:
            return await local(registry, agent or _ANONYMOUS)

    return asyncio.run(run()), "from the config file (no daemon answers)"


def _agents(agents: list[str]) -> str:
    shown = ["every other agent" if a == "*" else a for a in agents]
    if shown == ["every other agent"]:
        return "all"
    return ", ".join(shown) or "none"
