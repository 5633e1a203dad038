"""``pcrt ui``: where the daemon's dashboard is, opened in a browser where there is a
desktop to open it on."""

from __future__ import annotations

import os
import sys

import click

from pcrt.runtime.errors import PcrtError

__all__ = ["ui"]


def _desktop() -> bool:
    """Whether a graphical browser can open here: a Mac, or a display on Linux. Without
    one Python's ``webbrowser`` would start a text browser in this terminal."""
    return sys.platform == "darwin" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


@click.command()
@click.option(
    "--open/--no-open",
    "open_it",
    default=None,
    help="Open it in the browser (default: where there is a desktop).",
)
def ui(open_it: bool | None) -> None:
    """Show the dashboard's address (models, DAG runs live, peers, usage, KV store)."""
    from pcrt.cli.client import DaemonClient

    with DaemonClient() as client:
        url = client.url + "/ui/"
        if not client.is_up():
            raise PcrtError(
                f"no pcrt daemon answers at {client.url}: start one (pcrt serve, or pcrt "
                "service install), then open " + url
            )
        asks = client.asks_for_a_key()
    click.echo(url)
    if asks:
        click.echo("it asks for the daemon's API key (once per browser)", err=True)
    if open_it or (open_it is None and _desktop()):
        import webbrowser

        if not webbrowser.open(url):
            click.echo("no browser could be opened here: open the address above", err=True)
