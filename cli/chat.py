"""``pcrt chat [MODEL]``: an interactive conversation that reuses its KV between turns.

Each turn renders the whole conversation with the chat template; the engine finds the
previous turns' tokens in the slot and only computes the new ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from pcrt.cli.run import (
    build_sampling,
    record_local_usage,
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

_HELP = (
    'Commands: /clear forgets the conversation, /bye (or Ctrl-D) leaves; """ starts and '
    "ends a message of several lines; Ctrl-C stops a reply."
)
_FENCE = '"""'  # Ollama's: a message of several lines goes between two of these


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
    from pcrt.cli.progress import load_model

    engine = load_model(registry, model, parallel=1, context=context, n_threads=threads)
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
        record_local_usage(engine.name, result, "pcrt chat")
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
    """Read a message, answer it, until /bye or Ctrl-D. Ctrl-C stops a reply and stays
    (the unfinished turn is left out of the conversation), as Ollama's chat does; at the
    prompt it says how to leave."""
    from pcrt.runtime.engine.chat import ChatMessage

    _with_line_editing()
    base = [ChatMessage(role="system", content=system)] if system else []
    messages = list(base)
    click.echo(f"chatting with {name}. {_HELP}", err=True)
    while True:
        try:
            text = _read_message()
        except EOFError:
            click.echo(err=True)
            return
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-D or /bye leaves)", err=True)
            continue
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return
        if text == "/clear":
            messages = list(base)
            click.echo("(conversation cleared)", err=True)
            continue
        if text in ("/help", "/?"):
            click.echo(_HELP, err=True)
            continue
        if text.startswith("/") and " " not in text:
            click.echo(f"unknown command {text}. {_HELP}", err=True)
            continue
        asked = [*messages, ChatMessage(role="user", content=text)]
        try:
            answer = turn(asked)
        except KeyboardInterrupt:
            click.echo("\n(stopped)", err=True)
            continue
        messages = [*asked, ChatMessage(role="assistant", content=answer)]


def _read_message() -> str:
    """One message: a line, or the lines between two \"\"\" (EOFError at Ctrl-D)."""
    line = input(">>> ").strip()
    if not line.startswith(_FENCE):
        return line
    rest, lines = line[len(_FENCE) :], []
    while not rest.rstrip().endswith(_FENCE):
        lines.append(rest)
        rest = input("... ")
    lines.append(rest.rstrip()[: -len(_FENCE)])
    return "\n".join(lines).strip()


def _with_line_editing() -> None:
    """Arrow keys and history at the prompt (the readline module hooks input())."""
    with contextlib.suppress(ImportError):  # Windows without pyreadline: plain input
        import readline  # noqa: F401
