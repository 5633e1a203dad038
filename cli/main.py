"""The ``pcrt`` command: a click group; each area lives in its own module."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from pcrt.runtime.errors import PcrtError

__all__ = ["main"]


class _Group(click.Group):
    """Turns pcrt's own errors into one clear line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PcrtError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.option("--log-level", default="WARNING", show_default=True, help="Python logging level.")
def main(log_level: str) -> None:
    """pcrt: an edge-first LLM runtime over llama.cpp."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from pcrt.cli import (
        announce,
        bench,
        chat,
        dag,
        device,
        models,
        peers,
        ps,
        run,
        serve,
        state,
        usage,
    )

    main.add_command(run.run)
    main.add_command(chat.chat)
    main.add_command(models.models)
    main.add_command(serve.serve)
    main.add_command(ps.ps)
    main.add_command(ps.stop)
    main.add_command(usage.usage)
    main.add_command(device.device)
    main.add_command(bench.bench)
    main.add_command(state.state)
    main.add_command(dag.dag)
    main.add_command(peers.peers)
    main.add_command(announce.announce)


_register()
