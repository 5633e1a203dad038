"""``pcrt run [MODEL] PROMPT``: one answer, streamed to the terminal."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from pcrt.cli.progress import download_progress
from pcrt.runtime.chat import ChatMessage
from pcrt.runtime.engine import Completion, Engine, GenerateRequest, TokenEvent
from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.loader import open_engine
from pcrt.runtime.models import Registry
from pcrt.runtime.sampling import SamplingParams

__all__ = ["run", "sampling_options", "stream_to_terminal", "verbose_report"]


def sampling_options(fn: Any) -> Any:
    """The sampling flags shared by ``run`` and ``chat``."""
    options = [
        click.option("--temperature", type=float, default=None, help="0 is greedy."),
        click.option("--max-tokens", type=int, default=None, help="Stop after this many."),
        click.option("--seed", type=int, default=None, help="Fix the sampler's random seed."),
        click.option("--ctx", "context", type=int, default=None, help="Context size per slot."),
        click.option("--threads", type=int, default=None, help="CPU threads for llama.cpp."),
        click.option("-v", "--verbose", is_flag=True, help="Print token counts and speeds."),
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
    handle = engine.submit(request)
    async for event in handle:
        if echo and isinstance(event, TokenEvent) and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
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
        ]
    )


@click.command()
@click.argument("args", nargs=-1, required=True)
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
    schema: Path | None,
    system: str | None,
    raw: bool,
    as_json: bool,
) -> None:
    """Answer PROMPT with MODEL (the default model when only PROMPT is given)."""
    if len(args) > 2:
        raise click.UsageError("give at most MODEL and PROMPT (quote the prompt)")
    model_name, prompt = (None, args[0]) if len(args) == 1 else args
    if prompt == "-":
        prompt = sys.stdin.read()
    schema_obj = _read_schema(schema) if schema else None
    sampling = build_sampling(temperature, max_tokens, seed, schema_obj)
    registry = Registry.load()
    engine = open_engine(
        registry,
        model_name,
        progress=download_progress,
        parallel=1,
        context=context,
        n_threads=threads,
    )
    with engine:
        if raw or not engine.chat.available:
            request = GenerateRequest(prompt=prompt, sampling=sampling)
        else:
            messages = [ChatMessage(role="system", content=system)] if system else []
            messages.append(ChatMessage(role="user", content=prompt))
            request = GenerateRequest(messages=messages, sampling=sampling)
        result = asyncio.run(stream_to_terminal(engine, request, echo=not as_json))
    if as_json:
        click.echo(json.dumps(_as_dict(engine.name, result), ensure_ascii=False))
    else:
        click.echo()
    if verbose:
        click.echo(verbose_report(result), err=True)


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
        "timings": {
            "prompt_seconds": round(result.prompt_seconds, 4),
            "prompt_tokens_per_second": round(result.prompt_tokens_per_second, 2),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
            "total_seconds": round(result.t_done - result.t_submitted, 4),
        },
    }
