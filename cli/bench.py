"""``pcrt bench [MODEL]``: prefill and decode tokens/s of a model on this machine.

The figures are stored keyed by the model file's sha256, the device fingerprint, the
offload plan and the thread count, and every run lists the model's past results. Figures
from another fingerprint (other hardware, another llama.cpp build) are shown as stale:
routing only trusts fresh ones, and ``--if-stale`` re-measures exactly when none is fresh.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from pcrt.cache.store import BenchRecord, Store
    from pcrt.device.offload import OffloadPlan
    from pcrt.device.profile import DeviceProfile
    from pcrt.runtime.models.benchmark import BenchProgress
    from pcrt.runtime.models.registry import Registry

__all__ = ["bench"]


@click.command()
@click.argument("model", required=False)
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="Prefill length.")
@click.option("--gen-tokens", type=int, default=64, show_default=True, help="Tokens to decode.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Keep the best of N.")
@click.option("--ctx", "context", type=int, default=None, help="Context per slot (pins it).")
@click.option("--threads", type=int, default=None, help="CPU threads for llama.cpp.")
@click.option("--if-stale", is_flag=True, help="Reuse a stored result that is still fresh.")
@click.option("--history", type=int, default=10, show_default=True, help="Past results shown.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(
    model: str | None,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    context: int | None,
    threads: int | None,
    if_stale: bool,
    history: int,
    as_json: bool,
) -> None:
    """Measure MODEL's prefill and decode speed here and store it."""
    from pcrt.cache.store import Store
    from pcrt.cli.progress import download_progress
    from pcrt.device.profile import collect_profile
    from pcrt.runtime.engine import EngineConfig
    from pcrt.runtime.models.hashing import file_sha256
    from pcrt.runtime.models.planning import plan_for
    from pcrt.runtime.models.pull import ensure_pulled
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    entry = registry.resolve(model)
    n_threads = threads or EngineConfig().n_threads
    profile = collect_profile()
    with Store(registry.paths.db_path) as store:
        path = ensure_pulled(entry, registry, progress=download_progress, store=store)
        sha256 = entry.sha256 or file_sha256(path, store)
        overrides: dict[str, Any] = {"parallel": 1, "context": context, "n_threads": n_threads}
        plan = plan_for(entry, path, profile=profile, **overrides)
        record = None
        if if_stale:
            record = store.latest_bench(sha256, profile.fingerprint, plan.key, n_threads)
        measured = record is None
        if record is None:
            record = _measure(
                registry,
                entry.name,
                sha256,
                profile,
                plan,
                overrides,
                store,
                prompt_tokens=prompt_tokens,
                gen_tokens=gen_tokens,
                repeats=repeats,
                quiet=as_json,
            )
        past = store.bench_results(sha256, limit=history)
    if as_json:
        data = {
            "model": entry.name,
            "model_sha256": sha256,
            "fingerprint": profile.fingerprint,
            "plan_key": plan.key,
            "measured": measured,
            "result": _as_dict(record, profile, plan, n_threads),
            "history": [_as_dict(r, profile, plan, n_threads) for r in past],
        }
        click.echo(json.dumps(data, indent=2))
        return
    how = "measured" if measured else "fresh result from " + record.measured_at
    click.echo(
        f"{entry.name}: prefill {record.prefill_tps:.1f} tokens/s ({record.prompt_tokens} "
        f"tokens), decode {record.decode_tps:.1f} tokens/s ({record.decode_tokens} tokens); {how}"
    )
    click.echo(f"plan: {plan.reason}")
    _console().print(_history_table(past, profile, plan, n_threads))


def _measure(
    registry: Registry,
    name: str,
    sha256: str,
    profile: DeviceProfile,
    plan: OffloadPlan,
    overrides: dict[str, Any],
    store: Store,
    *,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    quiet: bool,
) -> BenchRecord:
    import asyncio

    from pcrt.cache.store import BenchRecord
    from pcrt.runtime.models.benchmark import run_bench
    from pcrt.runtime.models.loader import open_engine

    engine = open_engine(registry, name, store=store, profile=profile, **overrides)
    with engine, _progress(quiet) as progress:
        figures = asyncio.run(
            run_bench(
                engine,
                prompt_tokens=prompt_tokens,
                decode_tokens=gen_tokens,
                repeats=repeats,
                progress=progress,
            )
        )
    used = engine.plan or plan
    return store.add_bench_result(
        BenchRecord(
            model_sha256=sha256,
            model=name,
            fingerprint=profile.fingerprint,
            plan_key=used.key,
            n_threads=engine.config.n_threads,
            plan_json=used.model_dump_json(),
            prompt_tokens=figures.prompt_tokens,
            prefill_seconds=figures.prefill_seconds,
            prefill_tps=figures.prefill_tps,
            decode_tokens=figures.decode_tokens,
            decode_seconds=figures.decode_seconds,
            decode_tps=figures.decode_tps,
            llama_cpp_version=profile.build.llama_cpp_version,
            measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
    )


@contextmanager
def _progress(quiet: bool) -> Iterator[BenchProgress]:
    """A bar per phase on stderr (stdout stays clean for the result and ``--json``)."""
    if quiet:
        yield lambda phase, done, total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bars = Progress(
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    tasks: dict[str, Any] = {}
    with bars:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            bars.update(tasks[phase], completed=done, total=total)

        yield update


def _status(record: BenchRecord, profile: DeviceProfile, plan: OffloadPlan, threads: int) -> str:
    if record.fingerprint != profile.fingerprint:
        return "stale (other device)"
    if record.plan_key != plan.key or record.n_threads != threads:
        return "other plan"
    return "current"


def _as_dict(
    record: BenchRecord, profile: DeviceProfile, plan: OffloadPlan, threads: int
) -> dict[str, Any]:
    data = asdict(record)
    data.pop("plan_json")
    data["status"] = _status(record, profile, plan, threads)
    return data


def _history_table(
    records: list[BenchRecord], profile: DeviceProfile, plan: OffloadPlan, threads: int
) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", title="results for this model")
    for column in ("MEASURED", "PREFILL T/S", "DECODE T/S", "THREADS", "PLAN", "DEVICE", "STATUS"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.measured_at,
            f"{r.prefill_tps:.1f}",
            f"{r.decode_tps:.1f}",
            str(r.n_threads),
            r.plan_key,
            r.fingerprint,
            _status(r, profile, plan, threads),
        )
    return table


def _console() -> Console:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)
