"""The device profile: psutil and llama.cpp for real, NVML through a fake module object
(no NVIDIA GPU or library here), including every way NVML can fail."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import llama_cpp
import psutil
import pytest

from pcrt.device.offload import DeviceMemory
from pcrt.device.profile import (
    BuildInfo,
    DeviceProfile,
    NvmlProbe,
    collect_profile,
    load_pynvml,
    read_build_info,
)

GiB = 1024**3
GPU_BUILD = BuildInfo(
    llama_cpp_version="0.3.36",
    gpu_offload=True,
    backends=("CUDA", "CPU"),
    system_info="CUDA : ARCHS = 890 | CPU : AVX2 = 1 |",
)


class FakeNVMLError(Exception):
    """pynvml's NVMLError carries the NVML return code in ``value``."""

    def __init__(self, value: int, text: str = "") -> None:
        super().__init__(text or f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    name: str
    total: int
    free: int
    fails: bool = False  # the handle itself errors (a GPU fallen off the bus)
    temperature: int | None = 61  # None: NVML_ERROR_NOT_SUPPORTED


@dataclass
class FakeNvml:
    """Just the pynvml functions the profile calls."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: Exception | None = None
    inits: int = 0
    shutdowns: int = 0

    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_DRIVER_NOT_LOADED = 9

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.gpus[index].fails:
            raise FakeNVMLError(15, "GPU is lost")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.gpus[handle].name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:08d}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        g = self.gpus[handle]
        return SimpleNamespace(total=g.total, free=g.free, used=g.total - g.free)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        value = self.gpus[handle].temperature
        if value is None:
            raise FakeNVMLError(3, "Not Supported")
        return value

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 115_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return 320_000


def two_gpus() -> FakeNvml:
    return FakeNvml(
        gpus=[
            FakeGpu("NVIDIA GeForce RTX 4090", total=24 * GiB, free=22 * GiB),
            FakeGpu("NVIDIA GeForce RTX 3060", total=12 * GiB, free=8 * GiB, temperature=None),
        ]
    )


def test_two_gpus_read_in_full() -> None:
    nvml = two_gpus()
    profile = collect_profile(nvml=nvml, build=GPU_BUILD)
    first, second = profile.gpus
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA GeForce RTX 4090", "GPU-00000000")
    assert (first.memory_total, first.memory_free, first.memory_used) == (
        24 * GiB,
        22 * GiB,
        2 * GiB,
    )
    assert (first.utilization_percent, first.memory_utilization_percent) == (37.0, 12.0)
    assert first.temperature_c == 61.0
    assert (first.power_draw_w, first.power_limit_w) == (115.5, 320.0)
    assert second.temperature_c is None  # not supported: a missing reading, not a failure
    assert (profile.gpu.driver_version, profile.gpu.cuda_version) == ("550.54.15", "12.4")
    assert profile.gpu.reason is None and profile.gpu.errors == ()
    assert not profile.cpu_only and profile.cpu_only_reason is None
    assert (nvml.inits, nvml.shutdowns) == (1, 1)  # a one-shot profile closes NVML
    memory = DeviceMemory.from_profile(profile)
    assert [(g.index, g.free) for g in memory.gpus] == [(0, 22 * GiB), (1, 8 * GiB)]


def test_gpus_with_a_cpu_only_build() -> None:
    profile = collect_profile(nvml=two_gpus())  # this machine's real, CPU-only llama.cpp
    assert len(profile.gpus) == 2
    assert profile.cpu_only
    assert "no GPU backend" in (profile.cpu_only_reason or "")
    assert "RTX 4090" in (profile.cpu_only_reason or "")
    assert not DeviceMemory.from_profile(profile).gpu_offload


def test_nvml_package_missing() -> None:
    profile = collect_profile(nvml=None)
    assert profile.cpu_only and profile.gpus == ()
    assert profile.cpu_only_reason == "nvidia-ml-py (pynvml) is not installed"


def test_nvml_library_missing() -> None:
    nvml = FakeNvml(init_error=FakeNVMLError(12, "NVML Shared Library Not Found"))
    profile = collect_profile(nvml=nvml, build=GPU_BUILD)
    assert profile.cpu_only and profile.gpus == ()
    assert profile.cpu_only_reason == "NVML library not found (no NVIDIA driver installed)"
    assert nvml.shutdowns == 0  # never initialised, never shut down


def test_nvml_init_error() -> None:
    nvml = FakeNvml(init_error=FakeNVMLError(999, "Unknown Error"))
    profile = collect_profile(nvml=nvml, build=GPU_BUILD)
    assert profile.cpu_only
    assert profile.cpu_only_reason == "NVML init failed: FakeNVMLError: Unknown Error"
    broken = FakeNvml(init_error=OSError("libnvidia-ml.so.1: invalid ELF header"))
    reason = collect_profile(nvml=broken, build=GPU_BUILD).cpu_only_reason
    assert reason == "NVML init failed: OSError: libnvidia-ml.so.1: invalid ELF header"
    no_driver = FakeNvml(init_error=FakeNVMLError(9, "Driver Not Loaded"))
    reason = collect_profile(nvml=no_driver, build=GPU_BUILD).cpu_only_reason
    assert reason == "NVIDIA driver not loaded (FakeNVMLError: Driver Not Loaded)"


def test_one_device_erroring() -> None:
    # the only GPU errors: a CPU-only profile that says why
    nvml = FakeNvml(gpus=[FakeGpu("NVIDIA A10", total=24 * GiB, free=20 * GiB, fails=True)])
    profile = collect_profile(nvml=nvml, build=GPU_BUILD)
    assert profile.cpu_only and profile.gpus == ()
    assert profile.cpu_only_reason == "every GPU failed: GPU 0: FakeNVMLError: GPU is lost"
    assert nvml.shutdowns == 1
    # one of two errors: the other still counts, the error is kept
    nvml = two_gpus()
    nvml.gpus[0].fails = True
    profile = collect_profile(nvml=nvml, build=GPU_BUILD)
    assert [g.name for g in profile.gpus] == ["NVIDIA GeForce RTX 3060"]
    assert profile.gpus[0].index == 1
    assert profile.gpu.errors == ("GPU 0: FakeNVMLError: GPU is lost",)
    assert not profile.cpu_only


def test_no_gpu_present() -> None:
    profile = collect_profile(nvml=FakeNvml(), build=GPU_BUILD)
    assert profile.cpu_only_reason == "no NVIDIA GPU found"


def test_this_machine_with_the_real_pynvml() -> None:
    """Here nvidia-ml-py is installed but there is no NVIDIA driver: CPU only, with why."""
    probe = NvmlProbe(load_pynvml())
    if probe.open():
        probe.close()
        pytest.skip("this machine has a working NVML")
    profile = collect_profile()
    assert profile.cpu_only and profile.gpus == ()
    assert profile.cpu_only_reason == "NVML library not found (no NVIDIA driver installed)"
    assert profile.cpu.logical_cores == psutil.cpu_count()
    assert profile.cpu.physical_cores == psutil.cpu_count(logical=False)
    assert profile.cpu.model and profile.cpu.model != "unknown"
    assert 0 < profile.memory.available <= profile.memory.total == psutil.virtual_memory().total


def test_build_info_of_this_llama_cpp() -> None:
    build = read_build_info()
    assert build.llama_cpp_version == llama_cpp.__version__
    assert build.gpu_offload is False  # a CPU-only build
    assert "CPU" in build.backends
    assert build.supports == {"cuda": False, "metal": False, "vulkan": False}
    assert [d.type for d in build.devices] == ["cpu"]
    assert build.devices[0].memory_total == psutil.virtual_memory().total
    assert "AVX" in build.system_info or build.system_info  # flags of the build
    assert GPU_BUILD.supports == {"cuda": True, "metal": False, "vulkan": False}


def test_fingerprint_is_stable_and_specific() -> None:
    build = read_build_info()
    a = collect_profile(nvml=two_gpus(), build=build)
    nvml = two_gpus()
    nvml.gpus[0].free = 1 * GiB  # live values change...
    b = collect_profile(nvml=nvml, build=build)
    assert a.fingerprint == b.fingerprint  # ...the fingerprint does not
    assert len(a.fingerprint) == 16
    # a different GPU, llama.cpp build or CPU changes it
    other_gpu = two_gpus()
    other_gpu.gpus[1].total = 16 * GiB
    assert collect_profile(nvml=other_gpu, build=build).fingerprint != a.fingerprint
    newer = build.model_copy(update={"llama_cpp_version": "0.3.99"})
    assert collect_profile(nvml=two_gpus(), build=newer).fingerprint != a.fingerprint
    cuda = build.model_copy(update={"gpu_offload": True, "backends": ("CUDA", "CPU")})
    assert collect_profile(nvml=two_gpus(), build=cuda).fingerprint != a.fingerprint
    cpu = a.cpu.model_copy(update={"physical_cores": 64})
    assert a.model_copy(update={"cpu": cpu}).fingerprint != a.fingerprint


def test_json_round_trip_keeps_the_fingerprint() -> None:
    profile = collect_profile(nvml=two_gpus(), build=GPU_BUILD)
    text = profile.model_dump_json()
    again = DeviceProfile.model_validate_json(text)
    assert again == profile and again.fingerprint == profile.fingerprint
    # a newer peer's extra fields are ignored, not fatal
    data = profile.model_dump(mode="json")
    data["from_the_future"] = {"x": 1}
    assert DeviceProfile.model_validate(data).fingerprint == profile.fingerprint


def test_probe_stays_open_until_closed() -> None:
    nvml = two_gpus()
    probe = NvmlProbe(nvml)
    first = probe.read()
    nvml.gpus[0].free = 3 * GiB
    second = probe.read()
    assert first.gpus[0].memory_free == 22 * GiB and second.gpus[0].memory_free == 3 * GiB
    assert (nvml.inits, nvml.shutdowns) == (1, 0)
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


# -- the GPU story: a GPU this build cannot use is said, with the command that builds one


def _plan_for(profile: DeviceProfile) -> str:
    """The offload plan's reason for a 7B model (test_offload's synthetic one) there."""
    from pcrt.device.offload import PlanRequest, plan_offload
    from tests.test_offload import SEVEN_B

    memory = DeviceMemory.from_profile(profile)
    return plan_offload(SEVEN_B, memory, PlanRequest(context=4096)).reason


def test_a_gpu_with_a_build_without_its_backend_says_how_to_build_one() -> None:
    cpu_build = GPU_BUILD.model_copy(
        update={"gpu_offload": False, "backends": ("CPU",), "system_info": "CPU : AVX2 = 1 |"}
    )
    profile = collect_profile(nvml=two_gpus(), build=cpu_build)
    assert profile.missing_backend() == "cuda"
    assert profile.rebuild_command() == (
        'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
        "llama-cpp-python==0.3.36"
    )
    reason = _plan_for(profile)
    assert reason.startswith("CPU only (this llama-cpp-python build has no GPU backend")
    assert "RTX 4090" in reason

    from rich.console import Console

    from pcrt.cli.device_view import profile_table

    console = Console(width=400, record=True)
    console.print(profile_table(profile))
    shown = console.export_text()
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in shown and "CUDA toolkit" in shown


def test_a_gpu_with_its_backend_needs_no_rebuild_and_gets_layers() -> None:
    profile = collect_profile(nvml=two_gpus(), build=GPU_BUILD)
    assert profile.missing_backend() is None and profile.rebuild_command() is None
    assert "layers on" in _plan_for(profile)


def test_no_gpu_needs_no_rebuild() -> None:
    profile = collect_profile(nvml=FakeNvml(gpus=[]), build=GPU_BUILD.model_copy(
        update={"gpu_offload": False}
    ))  # fmt: skip
    assert profile.cpu_only_reason == "no NVIDIA GPU found"
    assert profile.missing_backend() is None and profile.rebuild_command() is None
    assert _plan_for(profile).startswith("CPU only (no NVIDIA GPU found)")


def test_apple_silicon_without_metal_is_told_to_build_metal() -> None:
    profile = collect_profile(nvml=None, build=GPU_BUILD.model_copy(update={"gpu_offload": False}))
    mac = profile.model_copy(
        update={"os": "Darwin 23.4.0", "cpu": profile.cpu.model_copy(update={"arch": "arm64"})}
    )
    assert mac.missing_backend() == "metal"
    assert 'CMAKE_ARGS="-DGGML_METAL=on"' in (mac.rebuild_command() or "")


def test_the_daemon_says_it_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from pcrt.runtime.server.lifespan import _say_gpu_unused

    cpu_build = GPU_BUILD.model_copy(update={"gpu_offload": False, "backends": ("CPU",)})
    with caplog.at_level("WARNING"):
        _say_gpu_unused(collect_profile(nvml=two_gpus(), build=cpu_build))
        _say_gpu_unused(collect_profile(nvml=two_gpus(), build=GPU_BUILD))  # nothing to say
    (said,) = caplog.records
    assert "every layer runs on the CPU" in said.getMessage()
    assert "-DGGML_CUDA=on" in said.getMessage() and "CUDA toolkit" in said.getMessage()
