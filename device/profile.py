"""The device profile: what this machine has to run models on, and a fingerprint of it.

Three sources, each failing on its own without taking the others down:

- psutil: cores, CPU frequency, RAM, swap, battery, temperatures, load;
- NVML (nvidia-ml-py, imported as ``pynvml``): each NVIDIA GPU's memory, utilisation,
  temperature and power. No package, no library, an init error or a GPU that errors: the
  profile says why and carries on CPU-only (or without that GPU), it never raises;
- llama.cpp itself: the llama-cpp-python version, whether the build can offload to a GPU at
  all, its backends (CPU, CUDA, Metal, Vulkan, ...) and the devices it sees.

The planner reads free memory from here; the benchmark keys its figures by the fingerprint,
which covers only what would change a benchmark (never live values such as free memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Final, Literal

import psutil
from pydantic import BaseModel, ConfigDict, computed_field

__all__ = [
    "IMPORT_PYNVML",
    "PROFILE_VERSION",
    "BackendDevice",
    "Battery",
    "BuildInfo",
    "CpuInfo",
    "DeviceProfile",
    "GpuInfo",
    "GpuReport",
    "MemoryInfo",
    "NvmlProbe",
    "Temperature",
    "collect_profile",
    "load_pynvml",
    "read_build_info",
    "refresh_profile",
]

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
"""Bumped when the profile's shape changes incompatibly (peers read each other's)."""

IMPORT_PYNVML: Final = object()
"""Default of the ``nvml`` parameters: import the real pynvml (tests pass a fake module)."""

NVML_ERROR_LIBRARY_NOT_FOUND = 12  # nvml.h; pynvml names it the same
NVML_ERROR_DRIVER_NOT_LOADED = 9


class _Model(BaseModel):
    # profiles travel between peers of different versions: ignore fields we do not know
    model_config = ConfigDict(frozen=True, extra="ignore")


class CpuInfo(_Model):
    model: str
    arch: str
    physical_cores: int | None
    logical_cores: int | None
    freq_mhz: float | None
    freq_max_mhz: float | None
    load_avg: tuple[float, float, float] | None
    """1, 5 and 15 minute load averages (live)."""
    percent: float | None
    """Utilisation since the previous sample (live; None when not sampled)."""


class MemoryInfo(_Model):
    total: int
    available: int
    """Live: what a new allocation can get without swapping (psutil's ``available``)."""
    used: int
    swap_total: int
    swap_used: int


class Battery(_Model):
    percent: float
    plugged_in: bool | None
    seconds_left: int | None
    """None when unknown or unlimited (on mains power)."""


class Temperature(_Model):
    sensor: str
    label: str
    current_c: float
    high_c: float | None = None
    critical_c: float | None = None


class GpuInfo(_Model):
    """One NVIDIA GPU as NVML reports it. Optional readings are None when unsupported."""

    index: int
    name: str
    uuid: str | None
    memory_total: int
    memory_free: int
    memory_used: int
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None
    temperature_c: float | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None


class GpuReport(_Model):
    """What NVML gave: the GPUs that answered, and why the others (or all) are missing."""

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    reason: str | None = None
    """Why there is no usable GPU; None when at least one answered."""
    errors: tuple[str, ...] = ()
    """Per-device failures that were skipped (the other GPUs still count)."""


class BackendDevice(_Model):
    """A device llama.cpp's ggml registry sees (these are what it can actually use)."""

    name: str
    description: str
    type: Literal["cpu", "gpu", "igpu", "accel", "unknown"]
    memory_free: int | None
    memory_total: int | None


# llama-cpp-python's own build switches for each GPU backend (its README)
_BACKEND_FLAGS = {
    "cuda": "-DGGML_CUDA=on",
    "metal": "-DGGML_METAL=on",
    "vulkan": "-DGGML_VULKAN=on",
}
# what each needs on the machine before that build works
BACKEND_NEEDS = {
    "cuda": "the CUDA toolkit (nvcc)",
    "metal": "the Xcode command line tools",
    "vulkan": "the Vulkan SDK",
}


class BuildInfo(_Model):
    """The llama.cpp build: a benchmark on another build is not comparable."""

    llama_cpp_version: str
    gpu_offload: bool
    """``llama_supports_gpu_offload()``: False on a CPU-only build, even with a GPU present."""
    backends: tuple[str, ...]
    """ggml backend registry names, e.g. ("CUDA", "CPU")."""
    system_info: str
    """``llama_print_system_info()``: backend and CPU feature flags of the build."""
    devices: tuple[BackendDevice, ...] = ()
    errors: tuple[str, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def supports(self) -> dict[str, bool]:
        """Whether the build has each GPU backend at all (from its registry and flags)."""
        text = " ".join(self.backends).lower() + " " + self.system_info.lower()
        return {name: bool(re.search(rf"\b{name}\b", text)) for name in ("cuda", "metal", "vulkan")}


class DeviceProfile(_Model):
    """Everything the planner, the benchmark and peers need to know about a machine."""

    version: int = PROFILE_VERSION
    hostname: str
    os: str
    python: str
    collected_at: str
    cpu: CpuInfo
    memory: MemoryInfo
    battery: Battery | None
    temperatures: tuple[Temperature, ...]
    gpu: GpuReport
    build: BuildInfo

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        return self.gpu.gpus

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cpu_only(self) -> bool:
        """No GPU llama.cpp could offload to (none found, or a build without GPU support)."""
        return self.cpu_only_reason is not None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cpu_only_reason(self) -> str | None:
        gpu_devices = [d for d in self.build.devices if d.type in ("gpu", "igpu")]
        if not self.gpu.gpus and not gpu_devices:
            return self.gpu.reason or "no GPU found"
        if not self.build.gpu_offload:
            found = ", ".join(g.name for g in self.gpu.gpus) or ", ".join(
                d.description for d in gpu_devices
            )
            return f"this llama-cpp-python build has no GPU backend (GPU present: {found})"
        return None

    def missing_backend(self) -> str | None:
        """The GPU backend this machine has a GPU for but this llama.cpp build lacks:
        "cuda" (NVML sees an NVIDIA GPU), "metal" (Apple silicon), "vulkan" (a GPU the
        build's own registry lists); None when nothing is missing or nothing is known."""
        if self.build.gpu_offload:
            return None
        if self.gpu.gpus:
            return "cuda"
        if self.os.lower().startswith("darwin") and self.cpu.arch.lower() in ("arm64", "aarch64"):
            return "metal"
        if any(d.type in ("gpu", "igpu") for d in self.build.devices):
            return "vulkan"
        return None

    def rebuild_command(self) -> str | None:
        """The command that rebuilds llama-cpp-python (the same version) with the backend
        this machine's GPU needs; None when none is missing."""
        backend = self.missing_backend()
        if backend is None:
            return None
        flag = _BACKEND_FLAGS[backend]
        return (
            f'CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir '
            f"llama-cpp-python=={self.build.llama_cpp_version}"
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fingerprint(self) -> str:
        """Stable hash of what changes a benchmark: CPU, cores, GPUs, llama.cpp build."""
        key = {
            "cpu": [self.cpu.model, self.cpu.arch, self.cpu.physical_cores, self.cpu.logical_cores],
            "gpus": sorted([g.name, g.memory_total] for g in self.gpu.gpus),
            "devices": sorted(
                [d.type, d.description, d.memory_total if d.type != "cpu" else None]
                for d in self.build.devices
            ),
            "llama_cpp": self.build.llama_cpp_version,
            "gpu_offload": self.build.gpu_offload,
            "backends": sorted(self.build.backends),
            "system_info": self.build.system_info,
        }
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# -- NVML -----------------------------------------------------------------------------


def load_pynvml() -> Any | None:
    """The ``pynvml`` module of nvidia-ml-py, or None when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class NvmlProbe:
    """An NVML session over a module object (the real pynvml or a test's fake).

    ``open`` initialises NVML once; ``read`` queries every GPU; ``close`` shuts it down. The
    daemon's monitor keeps one open between refreshes; a one-shot profile opens and closes.
    Nothing here raises: every failure becomes a ``GpuReport.reason`` or an entry in
    ``GpuReport.errors``.
    """

    def __init__(self, nvml: Any | None) -> None:
        self._nvml: Any = nvml
        self._open = False
        self._failure: str | None = None

    def open(self) -> bool:
        if self._open:
            return True
        nvml = self._nvml
        if nvml is None:
            self._failure = "nvidia-ml-py (pynvml) is not installed"
            return False
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError and whatever a broken install raises
            self._failure = _init_failure(nvml, exc)
            log.info("no NVML: %s", self._failure)
            return False
        self._open = True
        self._failure = None
        return True

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> NvmlProbe:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def read(self) -> GpuReport:
        if not self.open():
            return GpuReport(reason=self._failure)
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return GpuReport(reason=f"NVML could not count GPUs: {_describe(exc)}")
        driver = _optional(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        cuda = _optional(lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion()))
        gpus: list[GpuInfo] = []
        errors: list[str] = []
        for index in range(count):
            try:
                gpus.append(_read_gpu(nvml, index))
            except Exception as exc:
                message = f"GPU {index}: {_describe(exc)}"
                log.warning("skipping %s", message)
                errors.append(message)
        reason = None
        if count == 0:
            reason = "no NVIDIA GPU found"
        elif not gpus:
            reason = "every GPU failed: " + "; ".join(errors)
        return GpuReport(
            gpus=tuple(gpus),
            driver_version=driver,
            cuda_version=cuda,
            reason=reason,
            errors=tuple(errors),
        )


def _read_gpu(nvml: Any, index: int) -> GpuInfo:
    """Name and memory are required (a GPU without them is unusable); the rest optional."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    util = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
    power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))  # milliwatts
    limit = _optional(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    temperature = _optional(lambda: nvml.nvmlDeviceGetTemperature(handle, sensor))
    return GpuInfo(
        index=index,
        name=name,
        uuid=_optional(lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
        memory_total=int(mem.total),
        memory_free=int(mem.free),
        memory_used=int(mem.used),
        utilization_percent=float(util.gpu) if util is not None else None,
        memory_utilization_percent=float(util.memory) if util is not None else None,
        temperature_c=float(temperature) if temperature is not None else None,
        power_draw_w=power / 1000 if power is not None else None,
        power_limit_w=limit / 1000 if limit is not None else None,
    )


def _init_failure(nvml: Any, exc: Exception) -> str:
    code = getattr(exc, "value", None)
    not_found = getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", NVML_ERROR_LIBRARY_NOT_FOUND)
    no_driver = getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", NVML_ERROR_DRIVER_NOT_LOADED)
    if code == not_found:
        return "NVML library not found (no NVIDIA driver installed)"
    if code == no_driver:
        return f"NVIDIA driver not loaded ({_describe(exc)})"
    return f"NVML init failed: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _optional(read: Any) -> Any:
    """A reading the GPU may not support (NVML_ERROR_NOT_SUPPORTED on many cards)."""
    try:
        return read()
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda_version(value: Any) -> str:
    number = int(value)  # e.g. 12040 for CUDA 12.4
    return f"{number // 1000}.{number % 1000 // 10}"


# -- llama.cpp build -------------------------------------------------------------------

_DEV_TYPES: dict[int, Literal["cpu", "gpu", "igpu", "accel"]] = {
    0: "cpu",
    1: "gpu",
    2: "accel",
    3: "igpu",
}


def read_build_info() -> BuildInfo:
    """The llama.cpp build this process runs, and the devices its backends see."""
    import llama_cpp

    errors: list[str] = []
    try:
        llama_cpp.llama_backend_init()
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        system_info = _text(llama_cpp.llama_print_system_info()).strip()
    except Exception as exc:  # a broken build: still a profile, just a thin one
        errors.append(f"llama.cpp: {_describe(exc)}")
        offload, system_info = False, ""
    backends: tuple[str, ...] = ()
    devices: tuple[BackendDevice, ...] = ()
    try:
        backends, devices = _ggml_registry(Path(llama_cpp.__file__).parent / "lib")
    except Exception as exc:  # the registry is a nicety; flags and version still count
        errors.append(f"ggml registry: {_describe(exc)}")
    if not backends:  # fall back to the flags llama_print_system_info() prints
        backends = tuple(
            m for m in re.findall(r"(\w+) : ", system_info) if m.isupper() or m == "Metal"
        )
    return BuildInfo(
        llama_cpp_version=getattr(llama_cpp, "__version__", "unknown"),
        gpu_offload=offload,
        backends=backends,
        system_info=system_info,
        devices=devices,
        errors=tuple(errors),
    )


def _ggml_registry(lib_dir: Path) -> tuple[tuple[str, ...], tuple[BackendDevice, ...]]:
    """Backends and devices from ggml's registry (C API; llama-cpp-python does not bind it)."""
    ggml = ctypes.CDLL(str(_library(lib_dir, "ggml")))
    base = ctypes.CDLL(str(_library(lib_dir, "ggml-base")))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in ("ggml_backend_reg_name", "ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, fn).restype = ctypes.c_char_p
        getattr(base, fn).argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    size_p = ctypes.POINTER(ctypes.c_size_t)
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]

    backends = tuple(
        _text(base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)))
        for i in range(ggml.ggml_backend_reg_count())
    )
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            BackendDevice(
                name=_text(base.ggml_backend_dev_name(dev)),
                description=_text(base.ggml_backend_dev_description(dev)),
                type=_DEV_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"),
                memory_free=free.value or None,
                memory_total=total.value or None,
            )
        )
    return backends, tuple(devices)


def _library(lib_dir: Path, stem: str) -> Path:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll", f"lib{stem}.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise FileNotFoundError(f"no {stem} library in {lib_dir}")


# -- psutil ---------------------------------------------------------------------------


def _cpu_model() -> str:
    """psutil does not name the CPU: /proc/cpuinfo, sysctl on macOS, else ``platform``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=2,
                check=True,
            ).stdout.strip()
            if out:
                return out
    return platform.processor() or platform.machine() or "unknown"


def _cpu(model: str, percent_interval: float | None) -> CpuInfo:
    freq = _optional(psutil.cpu_freq)
    load = _optional(psutil.getloadavg)
    percent = None
    if percent_interval is not None:
        percent = _optional(lambda: psutil.cpu_percent(interval=percent_interval))
    return CpuInfo(
        model=model,
        arch=platform.machine(),
        physical_cores=_optional(lambda: psutil.cpu_count(logical=False)),
        logical_cores=_optional(lambda: psutil.cpu_count(logical=True)) or os.cpu_count(),
        freq_mhz=float(freq.current) if freq and freq.current else None,
        freq_max_mhz=float(freq.max) if freq and freq.max else None,
        load_avg=(round(load[0], 2), round(load[1], 2), round(load[2], 2)) if load else None,
        percent=percent,
    )


def _memory() -> MemoryInfo:
    vm = psutil.virtual_memory()
    swap = _optional(psutil.swap_memory)
    return MemoryInfo(
        total=int(vm.total),
        available=int(vm.available),
        used=int(vm.used),
        swap_total=int(swap.total) if swap else 0,
        swap_used=int(swap.used) if swap else 0,
    )


def _battery() -> Battery | None:
    reader = getattr(psutil, "sensors_battery", None)
    battery = _optional(reader) if reader else None
    if battery is None:
        return None
    secs = battery.secsleft
    known = isinstance(secs, int | float) and secs >= 0  # POWER_TIME_UNKNOWN/UNLIMITED < 0
    return Battery(
        percent=float(battery.percent),
        plugged_in=battery.power_plugged,
        seconds_left=int(secs) if known else None,
    )


def _temperatures() -> tuple[Temperature, ...]:
    reader = getattr(psutil, "sensors_temperatures", None)  # absent on Windows and macOS
    sensors = (_optional(reader) if reader else None) or {}
    out = []
    for sensor, readings in sorted(sensors.items()):
        for i, reading in enumerate(readings):
            out.append(
                Temperature(
                    sensor=sensor,
                    label=reading.label or f"{sensor}{i}",
                    current_c=float(reading.current),
                    high_c=reading.high,
                    critical_c=reading.critical,
                )
            )
    return tuple(out)


# -- the profile ------------------------------------------------------------------------


def collect_profile(
    *,
    nvml: Any = IMPORT_PYNVML,
    build: BuildInfo | None = None,
    cpu_percent_interval: float | None = None,
) -> DeviceProfile:
    """Profile this machine now. ``nvml``: a pynvml-like module (None: not installed).

    ``cpu_percent_interval`` samples CPU utilisation for that many seconds (None: skip;
    the monitor samples between refreshes instead of blocking).
    """
    module = load_pynvml() if nvml is IMPORT_PYNVML else nvml
    with NvmlProbe(module) as probe:
        gpu = probe.read()
    return DeviceProfile(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        collected_at=_now(),
        cpu=_cpu(_cpu_model(), cpu_percent_interval),
        memory=_memory(),
        battery=_battery(),
        temperatures=_temperatures(),
        gpu=gpu,
        build=build or read_build_info(),
    )


def refresh_profile(
    profile: DeviceProfile, *, probe: NvmlProbe | None = None, sample_cpu: bool = True
) -> DeviceProfile:
    """The same profile with its live fields re-read: memory, battery, temperatures, load,
    GPU memory and readings. The build and the CPU model are not re-read (they cannot
    change while the process runs)."""
    cpu = _cpu(profile.cpu.model, None)
    if sample_cpu:  # utilisation since the previous call: the monitor calls this regularly
        cpu = cpu.model_copy(update={"percent": _optional(lambda: psutil.cpu_percent(None))})
    update: dict[str, Any] = {
        "collected_at": _now(),
        "cpu": cpu,
        "memory": _memory(),
        "battery": _battery(),
        "temperatures": _temperatures(),
    }
    if probe is not None:
        update["gpu"] = probe.read()
    return profile.model_copy(update=update)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
