"""``pcrt completion bash|zsh|fish``: the shell script that completes pcrt's commands,
options and arguments (click's own completion, so it follows every command as it is)."""

from __future__ import annotations

import click

__all__ = ["completion"]


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash:  eval "$(pcrt completion bash)"        (in ~/.bashrc)
    zsh:   eval "$(pcrt completion zsh)"         (in ~/.zshrc)
    fish:  pcrt completion fish > ~/.config/fish/completions/pcrt.fish
    """
    from click.shell_completion import get_completion_class

    from pcrt.cli.main import main

    script = get_completion_class(shell)
    assert script is not None  # the choices are the shells click knows
    click.echo(script(main, {}, "pcrt", "_PCRT_COMPLETE").source())
