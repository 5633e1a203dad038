"""``pcrt run [MODEL] PROMPT``: one answer, streamed to the terminal."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pcrt.runtime.errors import InvalidRequest

if TYPE_CHECKING:
    from rich.console import Console

    from pcrt.cli.client import DaemonClient, StreamResult
    from pcrt.runtime.engine import Completion, Engine, GenerateRequest
    from pcrt.runtime.engine.sampling import SamplingParams
    from pcrt.runtime.models.registry import Registry

__all__ = [
    "remote_body",
    "remote_report",
    "run",
    "sampling_options",
    "stream_remote",
    "stream_to_terminal",
    "verbose_report",
]

# what sets a model's name apart from a prompt's first word: a dash, a colon, a dot or
# a digit (smollm2, qwen2.5:7b, my-model), none of which starts an English sentence
_MODEL_SHAPED = re.compile(r"[-:./0-9]")


def sampling_options(fn: Any) -> Any:
    """The sampling flags shared by ``run`` and ``chat``."""
    options = [
        click.option("--temperature", type=float, default=None, help="0 is greedy."),
        click.option("--max-tokens", type=int, default=None, help="Stop after this many."),
        click.option("--seed", type=int, default=None, help="Fix the sampler's random seed."),
        click.option("--ctx", "context", type=int, default=None, help="Context size per slot."),
        click.option("--threads", type=int, default=None, help="CPU threads for llama.cpp."),
        click.option("-v", "--verbose", is_flag=True, help="Print token counts and speeds."),
        click.option("--local", is_flag=True, help="Run in this process even if a daemon is up."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_sampling(
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    schema: dict[str, Any] | None = None,
) -> SamplingParams:
    from pcrt.runtime.engine.sampling import SamplingParams

    values: dict[str, Any] = {"json_schema": schema}
    if temperature is not None:
        values["temperature"] = temperature
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    if seed is not None:
        values["seed"] = seed
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


async def stream_to_terminal(engine: Engine, request: GenerateRequest, echo: bool) -> Completion:
    from pcrt.runtime.engine import TokenEvent

    handle = engine.submit(request)
    try:
        async for event in handle:
            if echo and isinstance(event, TokenEvent) and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except BaseException:  # Ctrl-C (the task cancelled): the engine stops it too
        handle.cancel()
        raise
    assert handle.result is not None
    return handle.result


def verbose_report(result: Completion) -> str:
    """The figures ``ollama run --verbose`` prints, plus reused prompt tokens."""
    total = result.t_done - result.t_submitted
    return "\n".join(
        [
            f"total duration:       {total:.3f}s",
            f"prompt eval count:    {result.prompt_tokens} token(s)",
            f"reused prompt tokens: {result.cached_tokens}",
            f"prompt eval duration: {result.prompt_seconds:.3f}s",
            f"prompt eval rate:     {result.prompt_tokens_per_second:.2f} tokens/s",
            f"eval count:           {result.completion_tokens} token(s)",
            f"eval rate:            {result.decode_tokens_per_second:.2f} tokens/s",
            *(
                [f"grammar compile:      {result.grammar_seconds * 1000:.1f}ms (once per model)"]
                if result.grammar_seconds is not None
                else []
            ),
        ]
    )


@click.command()
@click.argument("args", nargs=-1)
@sampling_options
@click.option(
    "--schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON schema file: the answer is constrained to it.",
)
@click.option("--system", default=None, help="A system message before the prompt.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(
    args: tuple[str, ...],
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    context: int | None,
    threads: int | None,
    verbose: bool,
    local: bool,
    schema: Path | None,
    system: str | None,
    raw: bool,
    as_json: bool,
) -> None:
    """Answer PROMPT with MODEL (the default model when only PROMPT is given).

    The prompt's words may be unquoted (pcrt run smollm2 Tell me a joke); a model name
    alone at a terminal opens a chat with it (pcrt run smollm2). Text piped in is the
    prompt when none is given (echo "Hi" | pcrt run), and follows it otherwise
    (cat notes.md | pcrt run "Summarize:"); PROMPT "-" reads the prompt from standard
    input alone. Talks to a running daemon (PCRT_URL) when one answers, else runs in
    this process.
    """
    from pcrt.cli.client import DaemonClient
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    piped = _piped_text()
    model_name, prompt = _model_and_prompt(args, registry)
    if model_name is not None and not prompt and piped is None and _at_terminal():
        # a model name alone at a terminal: a chat with it, as `ollama run MODEL` opens;
        # the chat command by name, through the group (pcrt.cli.chat imports this module)
        ctx = click.get_current_context()
        group = ctx.find_root().command
        assert isinstance(group, click.Group)
        chat = group.get_command(ctx, "chat")
        assert chat is not None
        ctx.invoke(
            chat,
            model=model_name,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            context=context,
            threads=threads,
            verbose=verbose,
            local=local,
            system=system,
        )
        return
    if prompt == "-":
        prompt = piped or ""
    elif piped:
        prompt = f"{prompt}\n\n{piped}" if prompt else piped
    if not prompt.strip():
        raise click.UsageError(
            'the prompt is empty: give one (pcrt run "Hi"), or pipe text in (echo Hi | pcrt run)'
        )
    schema_obj = _read_schema(schema) if schema else None
    sampling = build_sampling(temperature, max_tokens, seed, schema_obj)
    if not local:
        with DaemonClient() as client:
            if client.is_up():
                wire = [{"role": "system", "content": system}] if system else []
                wire.append({"role": "user", "content": prompt})
                name = registry.resolve(model_name).name
                path, body = remote_body(name, sampling, wire, None if not raw else prompt)
                answered = stream_remote(client, path, body, echo=not as_json)
                _report_remote(name, answered, as_json, verbose)
                return
    import asyncio

    from pcrt.cli.progress import load_model
    from pcrt.runtime.engine import GenerateRequest
    from pcrt.runtime.engine.chat import ChatMessage

    engine = load_model(registry, model_name, parallel=1, context=context, n_threads=threads)
    with engine:
        if raw or not engine.chat.available:
            request = GenerateRequest(prompt=prompt, sampling=sampling)
        else:
            messages = [ChatMessage(role="system", content=system)] if system else []
            messages.append(ChatMessage(role="user", content=prompt))
            request = GenerateRequest(messages=messages, sampling=sampling)
        result = asyncio.run(stream_to_terminal(engine, request, echo=not as_json))
    record_local_usage(engine.name, result, "pcrt run")
    if as_json:
        click.echo(json.dumps(_as_dict(engine.name, result), ensure_ascii=False))
    else:
        click.echo()
    if verbose:
        click.echo(verbose_report(result), err=True)


LOCAL_AGENT = "cli"  # what pcrt usage calls the work the command line ran itself


def record_local_usage(model: str, result: Completion, route: str) -> None:
    """A usage row for a generation this process ran (no daemon), as the daemon writes
    one per request: pcrt usage counts all the machine's work, not only the daemon's."""
    from pcrt.cache.store import Store
    from pcrt.cache.usage import UsageLog, UsageRecord
    from pcrt.runtime.paths import Paths

    first = result.t_first_token
    row = UsageRecord(
        agent=LOCAL_AGENT,
        model=model,
        route=route,
        status=200,
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
        completion_tokens=result.completion_tokens,
        ttft_ms=1000 * (first - result.t_submitted) if first is not None else None,
        total_ms=1000 * (result.t_done - result.t_submitted),
        request_id=result.id,
    )
    with Store(Paths.from_env().db_path) as store:
        usage = UsageLog(store)
        try:
            usage.record(row)
        finally:
            usage.close()


def _at_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _piped_text() -> str | None:
    """What was piped into the command (None at a terminal, where nothing is)."""
    if sys.stdin is None or _at_terminal():
        return None
    return sys.stdin.read()


def _model_and_prompt(args: tuple[str, ...], registry: Registry) -> tuple[str | None, str]:
    """MODEL (None: the default) and PROMPT from the arguments, whose words may be
    unquoted: a first word that names a model is the model; one shaped like a model's
    name (``qwen2.5:7b``, ``my-model``) that names none is an unknown model (with a
    did-you-mean), not the prompt's first word."""
    if not args:
        return None, ""
    first, rest = args[0], args[1:]
    if first != "-" and registry.knows(first):
        return first, " ".join(rest)
    if rest and _MODEL_SHAPED.search(first) and " " not in first:
        registry.resolve(first)  # raises ModelNotFound, with the closest names
    return None, " ".join(args)


def remote_body(
    model: str, sampling: SamplingParams, messages: list[dict[str, str]], raw_prompt: str | None
) -> tuple[str, dict[str, Any]]:
    """The API route and body for a request the daemon runs."""
    body: dict[str, Any] = {"model": model, "temperature": sampling.temperature}
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    body["max_tokens"] = sampling.max_tokens
    if sampling.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            # what the daemon does anyway (output is always constrained), said as OpenAI says it
            "json_schema": {"name": "answer", "schema": sampling.json_schema, "strict": True},
        }
    if raw_prompt is not None:
        return "/v1/completions", {**body, "prompt": raw_prompt}
    return "/v1/chat/completions", {**body, "messages": messages}


def stream_remote(
    client: DaemonClient, path: str, body: dict[str, Any], echo: bool
) -> StreamResult:
    from pcrt.cli.client import StreamResult

    for item in until_first(client.stream(path, body), "the daemon is loading the model"):
        if isinstance(item, StreamResult):
            return item
        if echo:
            sys.stdout.write(item)
            sys.stdout.flush()
    raise AssertionError("the stream ended without a result")


T = TypeVar("T")


def until_first(items: Iterator[T], waiting: str, console: Console | None = None) -> Iterator[T]:
    """``items``, with a spinner on a terminal's stderr until the first one arrives: a
    model loads on first use (seconds of nothing otherwise)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    with console.status(f"{waiting}...", spinner="dots"):  # gone once the answer starts
        first = next(items, None)
    if first is not None:
        yield first
        yield from items


def remote_report(result: StreamResult) -> str:
    usage = result.usage
    completion = usage.get("completion_tokens", 0)
    decode = result.t_done - (result.t_first or result.t_done)
    ttft = (result.t_first or result.t_done) - result.t_start
    rate = (completion - 1) / decode if completion > 1 and decode > 0 else 0.0
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return "\n".join(
        [
            f"total duration:       {result.t_done - result.t_start:.3f}s (through the daemon)",
            f"prompt eval count:    {usage.get('prompt_tokens', 0)} token(s)",
            f"reused prompt tokens: {cached}",
            f"time to first token:  {ttft:.3f}s",
            f"eval count:           {completion} token(s)",
            f"eval rate:            {rate:.2f} tokens/s",
        ]
    )


def _report_remote(model: str, result: StreamResult, as_json: bool, verbose: bool) -> None:
    if as_json:
        usage = result.usage
        data = {
            "model": model,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": usage.get("prompt_tokens", 0),
                "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                "completion_tokens": usage.get("completion_tokens", 0),
            },
            "ran_on": "daemon",
        }
        click.echo(json.dumps(data, ensure_ascii=False))
    else:
        click.echo()
    if verbose:
        click.echo(remote_report(result), err=True)


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: not a readable JSON schema: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{path}: a JSON schema must be an object")
    return value


def _as_dict(model: str, result: Completion) -> dict[str, Any]:
    choice = result.choices[0]
    return {
        "model": model,
        "text": choice.text,
        "finish_reason": choice.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens,
            "completion_tokens": result.completion_tokens,
        },
        "ran_on": "in-process",
        "timings": {
            "prompt_seconds": round(result.prompt_seconds, 4),
            "prompt_tokens_per_second": round(result.prompt_tokens_per_second, 2),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
            "total_seconds": round(result.t_done - result.t_submitted, 4),
        },
    }
