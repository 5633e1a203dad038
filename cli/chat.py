"""``pcrt chat [MODEL]``: an interactive conversation that reuses its KV between turns.

Each turn renders the whole conversation with the chat template; the engine finds the
previous turns' tokens in the slot and only computes the new ones.
"""

from __future__ import annotations

import asyncio

import click

from pcrt.cli.progress import download_progress
from pcrt.cli.run import build_sampling, sampling_options, stream_to_terminal, verbose_report
from pcrt.runtime.chat import ChatMessage
from pcrt.runtime.engine import GenerateRequest
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.loader import open_engine
from pcrt.runtime.models import Registry

__all__ = ["chat"]

_HELP = "Commands: /clear forgets the conversation, /bye (or Ctrl-D) leaves."


@click.command()
@click.argument("model", required=False)
@sampling_options
@click.option("--system", default=None, help="A system message for the whole conversation.")
def chat(
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    context: int | None,
    threads: int | None,
    verbose: bool,
    system: str | None,
) -> None:
    """Chat with MODEL (default model when none is named)."""
    sampling = build_sampling(temperature, max_tokens, seed)
    registry = Registry.load()
    engine = open_engine(
        registry,
        model,
        progress=download_progress,
        parallel=1,
        context=context,
        n_threads=threads,
    )
    if not engine.chat.available:
        engine.close()
        raise InvalidRequest(f"{engine.name!r} has no chat template; use `pcrt run --raw`")
    base = [ChatMessage(role="system", content=system)] if system else []
    messages = list(base)
    click.echo(f"chatting with {engine.name}. {_HELP}", err=True)
    with engine:
        while True:
            try:
                line = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
            except (EOFError, click.Abort):
                click.echo(err=True)
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/bye", "/exit", "/quit"):
                return
            if text == "/clear":
                messages = list(base)
                click.echo("(conversation cleared)", err=True)
                continue
            if text.startswith("/"):
                click.echo(_HELP, err=True)
                continue
            messages.append(ChatMessage(role="user", content=text))
            request = GenerateRequest(messages=list(messages), sampling=sampling)
            result = asyncio.run(stream_to_terminal(engine, request, echo=True))
            click.echo()
            messages.append(ChatMessage(role="assistant", content=result.text))
            if verbose:
                click.echo(verbose_report(result), err=True)
