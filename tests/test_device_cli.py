"""``pcrt device`` and ``pcrt device plan`` through click's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pcrt.cli.main import main
from pcrt.device.profile import DeviceProfile, collect_profile
from tests.test_device_profile import GPU_BUILD, FakeGpu, FakeNvml, GiB


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_device_table() -> None:
    result = invoke("device")
    assert result.exit_code == 0, result.output
    profile = collect_profile(nvml=None)
    for text in ("fingerprint", profile.fingerprint, "cores", "RAM", "llama.cpp", "CPU only"):
        assert text in result.output
    assert "NVML library not found" in result.output


def test_device_json() -> None:
    result = invoke("device", "--json")
    assert result.exit_code == 0, result.output
    profile = DeviceProfile.model_validate_json(result.output)
    data = json.loads(result.output)
    assert data["fingerprint"] == profile.fingerprint == collect_profile(nvml=None).fingerprint
    assert data["cpu_only"] is True and data["build"]["supports"]["cuda"] is False
    assert profile.cpu.percent is not None  # `pcrt device` samples utilisation


def test_device_plan_for_this_machine(default_model_path: Path) -> None:
    result = invoke("device", "plan")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "offload plan for smollm2-135m" in out
    assert "n_gpu_layers 0 of 31" in out
    assert "context 2048 per slot x 4; KV f16/f16, 180.0 MiB" in out  # serve's slots
    assert "pinned: context" in out
    assert "CPU only (NVML library not found" in out


def test_device_plan_json_with_flags(default_model_path: Path) -> None:
    result = invoke(
        "device",
        "plan",
        "smollm2",
        "--ctx",
        "4096",
        "--parallel",
        "2",
        "--kv-type",
        "q8_0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    plan = data["plan"]
    assert data["model"] == "smollm2-135m"
    assert (plan["context"], plan["parallel"], plan["type_k"], plan["flash_attn"]) == (
        4096,
        2,
        "q8_0",
        True,
    )
    # 2 slots x 4096 cells x 30 layers x (192 + 192) elements x 34/32 bytes
    assert plan["kv_bytes"] == 2 * 4096 * 30 * 2 * 204
    assert plan["pinned"] == ["context", "type_k", "type_v"]


def test_device_plan_for_another_machine(default_model_path: Path, tmp_path: Path) -> None:
    nvml = FakeNvml(gpus=[FakeGpu("NVIDIA RTX A2000", total=6 * GiB, free=4 * GiB)])
    other = collect_profile(nvml=nvml, build=GPU_BUILD)
    profile_file = tmp_path / "peer.json"
    profile_file.write_text(other.model_dump_json())
    result = invoke("device", "plan", "--profile", str(profile_file), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["device"]["fingerprint"] == other.fingerprint
    plan = data["plan"]
    assert plan["n_gpu_layers"] == 31 and plan["n_layers"] == 31
    assert plan["gpus"][0]["name"] == "NVIDIA RTX A2000"
    assert plan["reason"].startswith("31/31 layers on GPU 0 (NVIDIA RTX A2000)")

    table = invoke("device", "plan", "--profile", str(profile_file))
    assert table.exit_code == 0, table.output
    assert "GPU 0 NVIDIA RTX A2000" in table.output and "main_gpu 0" in table.output


def test_device_plan_rejects_a_bad_profile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hostname": "x"}')
    result = CliRunner().invoke(main, ["device", "plan", "--profile", str(bad)])
    assert result.exit_code == 1
    assert "not a device profile" in result.output


def test_device_plan_model_that_cannot_fit(default_model_path: Path, tmp_path: Path) -> None:
    tiny = collect_profile(nvml=None)
    memory = tiny.memory.model_copy(update={"available": 600 * 1024**2})  # 88 MiB to spend
    profile_file = tmp_path / "tiny.json"
    profile_file.write_text(tiny.model_copy(update={"memory": memory}).model_dump_json())
    result = CliRunner().invoke(main, ["device", "plan", "--profile", str(profile_file)])
    assert result.exit_code == 1
    assert "does not fit even at pinned context 2048" in result.output
    assert "short" in result.output


def test_device_plan_plans_the_slots_serve_will_use(
    default_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --parallel, the plan is for the daemon's slots (4 by default, or the
    config's), not for one: the KV it plans is what pcrt serve allocates."""
    monkeypatch.setenv("PCRT_CONFIG", str(tmp_path / "none.toml"))
    default = json.loads(invoke("device", "plan", "--json").output)["plan"]
    config = tmp_path / "config.toml"
    config.write_text("[server]\nparallel = 2\n", encoding="utf-8")
    monkeypatch.setenv("PCRT_CONFIG", str(config))
    configured = json.loads(invoke("device", "plan", "--json").output)["plan"]
    one = json.loads(invoke("device", "plan", "--json", "--parallel", "1").output)["plan"]
    assert (default["parallel"], configured["parallel"], one["parallel"]) == (4, 2, 1)
    assert default["kv_bytes"] == 2 * configured["kv_bytes"] == 4 * one["kv_bytes"]
