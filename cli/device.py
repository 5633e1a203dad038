"""``pcrt device``: this machine's profile, and ``pcrt device plan``: a model's offload plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pcrt.runtime.errors import ConfigError

if TYPE_CHECKING:
    from pcrt.device.profile import DeviceProfile

__all__ = ["device"]

KV_TYPES = click.Choice(["f16", "f32", "q8_0", "q4_0"])


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def device(ctx: click.Context, as_json: bool) -> None:
    """Show this machine's device profile (CPU, RAM, GPUs, llama.cpp build)."""
    if ctx.invoked_subcommand is not None:
        return
    from pcrt.cli.device_view import console, profile_table
    from pcrt.device.profile import collect_profile

    profile = collect_profile(cpu_percent_interval=0.2)
    if as_json:
        click.echo(profile.model_dump_json(indent=2))
        return
    console().print(profile_table(profile))


@device.command("plan")
@click.argument("model", required=False)
@click.option("--ctx", "context", type=int, default=None, help="Context per slot (pins it).")
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=None,
    help="Sequence slots (default: what pcrt serve uses, from PCRT_CONFIG or its default).",
)
@click.option("--kv-type", type=KV_TYPES, default=None, help="K and V cache type (pins it).")
@click.option("--n-gpu-layers", type=int, default=None, help="Pin the offloaded layer count.")
@click.option("--flash-attn/--no-flash-attn", default=None, help="Pin flash attention.")
@click.option(
    "--profile",
    "profile_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Plan for another machine: a profile from its `pcrt device --json`.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(
    model: str | None,
    context: int | None,
    parallel: int | None,
    kv_type: str | None,
    n_gpu_layers: int | None,
    flash_attn: bool | None,
    profile_file: Path | None,
    as_json: bool,
) -> None:
    """Show how MODEL would load here: layers on each GPU, context, memory per device."""
    from pcrt.cli.device_view import console, plan_lines, plan_table
    from pcrt.cli.progress import download_progress
    from pcrt.device.offload import PlanMargins
    from pcrt.device.profile import collect_profile
    from pcrt.runtime.models.planning import plan_for
    from pcrt.runtime.models.pull import ensure_pulled
    from pcrt.runtime.models.registry import Registry
    from pcrt.runtime.server.settings import ServerSettings

    if parallel is None:  # plan what the daemon will load: its slots, not one
        parallel = ServerSettings.load(None).parallel
    profile = read_profile(profile_file) if profile_file else collect_profile()
    registry = Registry.load()
    entry = registry.resolve(model)
    path = ensure_pulled(entry, registry, progress=download_progress)
    result = plan_for(
        entry,
        path,
        profile=profile,
        margins=PlanMargins(),
        context=context,
        parallel=parallel,
        type_k=kv_type,
        type_v=kv_type,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
    )
    if as_json:
        data: dict[str, Any] = {
            "model": entry.name,
            "device": {"hostname": profile.hostname, "fingerprint": profile.fingerprint},
            "plan": result.model_dump(mode="json"),
            "plan_key": result.key,
        }
        click.echo(json.dumps(data, indent=2))
        return
    console().print(plan_table(result))
    for line in plan_lines(result, profile):
        click.echo(line)


def read_profile(path: Path) -> DeviceProfile:
    from pydantic import ValidationError

    from pcrt.device.profile import DeviceProfile

    try:
        return DeviceProfile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise ConfigError(
            f"{path}: not a device profile from `pcrt device --json`: {exc}"
        ) from None
