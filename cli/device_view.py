"""What ``pcrt device`` prints: the profile table, an offload plan's table and lines."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pcrt.device.offload import OffloadPlan
from pcrt.device.profile import BACKEND_NEEDS, DeviceProfile
from pcrt.device.units import format_bytes

__all__ = ["console", "plan_lines", "plan_table", "profile_table"]


def profile_table(profile: DeviceProfile) -> Table:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    cpu, mem = profile.cpu, profile.memory
    table.add_row("host", f"{profile.hostname} ({profile.os}, Python {profile.python})")
    table.add_row("fingerprint", profile.fingerprint)
    table.add_row("CPU", f"{cpu.model} ({cpu.arch})")
    table.add_row(
        "cores", f"{cpu.physical_cores or '?'} physical, {cpu.logical_cores or '?'} logical"
    )
    if cpu.freq_mhz:
        top = f", max {cpu.freq_max_mhz:.0f}" if cpu.freq_max_mhz else ""
        table.add_row("frequency", f"{cpu.freq_mhz:.0f} MHz{top}")
    if cpu.load_avg:
        busy = f", {cpu.percent:.0f}% busy" if cpu.percent is not None else ""
        table.add_row("load", " ".join(f"{x:.2f}" for x in cpu.load_avg) + busy)
    table.add_row("RAM", f"{format_bytes(mem.available)} available of {format_bytes(mem.total)}")
    if mem.swap_total:
        table.add_row(
            "swap", f"{format_bytes(mem.swap_used)} used of {format_bytes(mem.swap_total)}"
        )
    if profile.battery:
        b = profile.battery
        state = "plugged in" if b.plugged_in else "on battery"
        left = f", {b.seconds_left // 60} min left" if b.seconds_left is not None else ""
        table.add_row("battery", f"{b.percent:.0f}% ({state}{left})")
    if profile.temperatures:
        hottest = max(profile.temperatures, key=lambda t: t.current_c)
        table.add_row(
            "temperature",
            f"{hottest.current_c:.0f} °C ({hottest.sensor}/{hottest.label}, hottest of "
            f"{len(profile.temperatures)})",
        )
    gpu = profile.gpu
    for g in gpu.gpus:
        readings = [
            f"{format_bytes(g.memory_free)} free of {format_bytes(g.memory_total)}",
            f"{g.utilization_percent:.0f}% busy" if g.utilization_percent is not None else "",
            f"{g.temperature_c:.0f} °C" if g.temperature_c is not None else "",
            f"{g.power_draw_w:.0f}/{g.power_limit_w:.0f} W"
            if g.power_draw_w is not None and g.power_limit_w is not None
            else "",
        ]
        table.add_row(f"GPU {g.index}", f"{g.name}: " + ", ".join(r for r in readings if r))
    if gpu.gpus:
        table.add_row(
            "NVIDIA driver", f"{gpu.driver_version or '?'} (CUDA {gpu.cuda_version or '?'})"
        )
    for error in gpu.errors:
        table.add_row("GPU error", error)
    build = profile.build
    supports = ", ".join(k for k, v in build.supports.items() if v) or "none"
    table.add_row(
        "llama.cpp",
        f"llama-cpp-python {build.llama_cpp_version}; backends {', '.join(build.backends) or '?'};"
        f" GPU offload {'yes' if build.gpu_offload else 'no'} (GPU backends: {supports})",
    )
    for dev in build.devices:
        memory = f", {format_bytes(dev.memory_total)}" if dev.memory_total else ""
        table.add_row("device", f"{dev.name} ({dev.type}): {dev.description}{memory}")
    reason = profile.cpu_only_reason
    table.add_row("offload", f"CPU only: {reason}" if reason else "GPU")
    command = profile.rebuild_command()
    if command is not None:  # a GPU this build cannot use: say how to build one that can
        needs = BACKEND_NEEDS[profile.missing_backend() or ""]
        table.add_row("GPU build", f"{command}  (needs {needs}; then check: pcrt device)")
    return table


def plan_table(plan: OffloadPlan) -> Table:
    table = Table(box=None, header_style="bold", title=f"offload plan for {plan.model}")
    for column in ("DEVICE", "LAYERS", "WEIGHTS", "KV", "COMPUTE", "TOTAL", "FREE"):
        table.add_column(column, justify="left" if column == "DEVICE" else "right")
    for g in plan.gpus:
        table.add_row(
            f"GPU {g.index} {g.name}",
            str(g.layers),
            format_bytes(g.weights),
            format_bytes(g.kv),
            format_bytes(g.compute),
            format_bytes(g.total),
            format_bytes(g.free),
        )
    r = plan.ram
    table.add_row(
        "RAM",
        str(r.layers),
        format_bytes(r.weights),
        format_bytes(r.kv),
        format_bytes(r.compute),
        format_bytes(r.total),
        format_bytes(r.available),
    )
    return table


def plan_lines(plan: OffloadPlan, profile: DeviceProfile | None) -> list[str]:
    context = f"{plan.context} per slot x {plan.parallel}"
    if plan.context != plan.context_requested:
        context += f" (asked {plan.context_requested})"
    lines = [
        f"plan: {plan.reason}",
        f"n_gpu_layers {plan.n_gpu_layers} of {plan.n_layers}"
        + (f", tensor_split {list(plan.tensor_split)}" if plan.tensor_split else "")
        + (f", main_gpu {plan.main_gpu}" if plan.gpus else ""),
        f"context {context}; KV {plan.type_k}/{plan.type_v}, {format_bytes(plan.kv_bytes)}; "
        f"flash attention {'on' if plan.flash_attn else 'off'}",
        f"pinned: {', '.join(plan.pinned) or 'nothing'}",
    ]
    lines += [f"note: {note}" for note in plan.notes]
    if profile is not None:
        lines.append(f"device: {profile.hostname} ({profile.fingerprint})")
    return lines


def console() -> Console:
    console = Console()
    # piped output keeps one row per line instead of folding at 80 columns
    return console if console.is_terminal else Console(width=200)
