"""``pcrt chat [MODEL]``: an interactive conversation that reuses its KV between turns.

Each turn renders the whole conversation with the chat template; the engine finds the
previous turns' tokens in the slot and only computes the new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from pcrt.cli.run import (
    build_sampling,
    remote_body,
    remote_report,
    sampling_options,
    stream_remote,
    stream_to_terminal,
    verbose_report,
)
from pcrt.runtime.errors import InvalidRequest

if TYPE_CHECKING:
    from pcrt.cli.client import DaemonClient
    from pcrt.runtime.engine import Engine
    from pcrt.runtime.engine.chat import ChatMessage
    from pcrt.runtime.engine.sampling import SamplingParams

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
    local: bool,
    system: str | None,
) -> None:
    """Chat with MODEL (default model when none is named).

    Talks to a running daemon (PCRT_URL) when one answers, else runs in this process.
    """
    from pcrt.cli.client import DaemonClient
    from pcrt.runtime.models.registry import Registry

    sampling = build_sampling(temperature, max_tokens, seed)
    registry = Registry.load()
    name = registry.resolve(model).name
    if not local:
        client = DaemonClient()
        if client.is_up():
            with client:
                _loop(name, system, _remote_turn(client, name, sampling, verbose))
            return
        client.close()
    from pcrt.cli.progress import download_progress
    from pcrt.runtime.models.loader import open_engine

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
    with engine:
        _loop(name, system, _local_turn(engine, sampling, verbose))


Turn = Callable[[list["ChatMessage"]], str]


def _local_turn(engine: Engine, sampling: SamplingParams, verbose: bool) -> Turn:
    import asyncio

    from pcrt.runtime.engine import GenerateRequest

    def turn(messages: list[ChatMessage]) -> str:
        request = GenerateRequest(messages=list(messages), sampling=sampling)
        result = asyncio.run(stream_to_terminal(engine, request, echo=True))
        click.echo()
        if verbose:
            click.echo(verbose_report(result), err=True)
        return result.text

    return turn


def _remote_turn(client: DaemonClient, name: str, sampling: SamplingParams, verbose: bool) -> Turn:
    def turn(messages: list[ChatMessage]) -> str:
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        path, body = remote_body(name, sampling, plain, None)
        result = stream_remote(client, path, body, echo=True)
        click.echo()
        if verbose:
            click.echo(remote_report(result), err=True)
        return result.text

    return turn


def _loop(name: str, system: str | None, turn: Turn) -> None:
    from pcrt.runtime.engine.chat import ChatMessage

    base = [ChatMessage(role="system", content=system)] if system else []
    messages = list(base)
    click.echo(f"chatting with {name}. {_HELP}", err=True)
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
        messages.append(ChatMessage(role="assistant", content=turn(messages)))
