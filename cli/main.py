"""The ``pcrt`` command: a click group whose commands each live in their own module.

The group imports a command's module only when that command runs (or when ``--help``
lists it), so ``pcrt ps`` does not pay for llama.cpp, FastAPI or mDNS. Command modules
keep their top-level imports light (click, the standard library, light pcrt modules) and
import what does the work inside the command; tests/test_cli_startup.py holds that.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from pcrt.runtime.errors import PcrtError

__all__ = ["COMMANDS", "main"]

# command name -> "module:attribute" of its click command
COMMANDS = {
    "announce": "pcrt.cli.announce:announce",
    "bench": "pcrt.cli.bench:bench",
    "cache": "pcrt.cli.cache:cache",
    "chat": "pcrt.cli.chat:chat",
    "completion": "pcrt.cli.completion:completion",
    "dag": "pcrt.cli.dag:dag",
    "device": "pcrt.cli.device:device",
    "logs": "pcrt.cli.logs:logs",
    "models": "pcrt.cli.models:models",
    "peers": "pcrt.cli.peers:peers",
    "ps": "pcrt.cli.ps:ps",
    "run": "pcrt.cli.run:run",
    "serve": "pcrt.cli.serve:serve",
    "service": "pcrt.cli.service:service",
    "state": "pcrt.cli.state:state",
    "stop": "pcrt.cli.ps:stop",
    "tools": "pcrt.cli.tools:tools",
    "ui": "pcrt.cli.ui:ui",
    "usage": "pcrt.cli.usage:usage",
    # Ollama's habits: the model commands without "models"
    "list": "pcrt.cli.models:list_models",
    "pull": "pcrt.cli.models:pull",
    "rm": "pcrt.cli.models:rm",
    "show": "pcrt.cli.models:show",
}


class _LazyGroup(click.Group):
    """click's LazyGroup pattern: commands named up front, their modules imported on use.

    It also turns pcrt's own errors into one clear line on stderr instead of a traceback.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PcrtError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_LazyGroup, lazy_commands=COMMANDS)
@click.version_option(package_name="pcrt", prog_name="pcrt")
@click.option("--log-level", default="WARNING", show_default=True, help="Python logging level.")
def main(log_level: str) -> None:
    """pcrt: an edge-first LLM runtime over llama.cpp."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
