"""The planner's estimates against what llama.cpp really allocates for the default model on
this CPU, and the loader using the plan."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from pcrt.device.offload import DeviceMemory, PlanRequest, plan_offload
from pcrt.device.profile import collect_profile
from pcrt.runtime.engine import Engine, EngineConfig, GenerateRequest
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.models.gguf_info import read_gguf_info
from pcrt.runtime.models.loader import open_engine
from pcrt.runtime.models.planning import model_shape
from pcrt.runtime.models.registry import Registry

MiB = 1024**2
LLAMA_LOG = "pcrt.runtime.engine.llama_model"  # llama.cpp's own log lines arrive here at DEBUG


def llama_figure(records: list[logging.LogRecord], pattern: str) -> float:
    """A MiB figure from llama.cpp's log, e.g. 'llama_kv_cache: size = 5.62 MiB'."""
    for record in records:
        m = re.search(pattern, record.getMessage())
        if m:
            return float(m[1]) * MiB
    raise AssertionError(f"llama.cpp logged nothing like {pattern!r}")


@pytest.mark.parametrize(("context", "parallel"), [(256, 1), (300, 2)])
def test_kv_weights_and_compute_match_llama_cpp(
    default_model_path: Path, caplog: pytest.LogCaptureFixture, context: int, parallel: int
) -> None:
    info = read_gguf_info(default_model_path)
    shape = model_shape(info, "smollm2-135m")
    plan = plan_offload(
        shape,
        DeviceMemory.from_profile(collect_profile(nvml=None)),
        PlanRequest(context=context, parallel=parallel),
    )
    caplog.set_level(logging.DEBUG, logger=LLAMA_LOG)
    config = EngineConfig(context=context, parallel=parallel, n_threads=2)
    with Engine(default_model_path, model_sha256="test", config=config) as engine:
        model_size = engine.model.size_bytes
    kv = llama_figure(caplog.records, r"llama_kv_cache: size = +([\d.]+) MiB")
    mapped = llama_figure(caplog.records, r"CPU_Mapped model buffer size = +([\d.]+) MiB")
    compute = llama_figure(caplog.records, r"CPU compute buffer size = +([\d.]+) MiB")

    # KV: llama.cpp prints MiB with two decimals; the estimate is exact (300 pads to 512)
    assert plan.kv_cells == (256 if context == 256 else 512)
    assert abs(plan.kv_bytes - kv) / kv < 0.01
    # weights: the estimate is the file's tensor bytes, and what llama.cpp maps
    assert plan.ram.weights == info.tensor_bytes.total == model_size
    assert abs(plan.ram.weights - mapped) < 0.01 * MiB
    # compute graph: Ollama's formula with the per-slot context, within 10%
    estimate = plan.ram.compute - 4 * shape.n_vocab * parallel  # minus the logits buffer
    assert abs(estimate - compute) / compute < 0.10


def test_kv_estimate_matches_a_filled_sequence_state(default_model_path: Path) -> None:
    """The state of a sequence holding n tokens is n cells of KV: 23,040 bytes a token."""
    shape = model_shape(read_gguf_info(default_model_path))
    plan = plan_offload(
        shape, DeviceMemory.from_profile(collect_profile(nvml=None)), PlanRequest(context=256)
    )
    per_token = plan.kv_bytes // plan.kv_cells
    assert per_token == 2 * 30 * 192 * 2 == 23_040
    config = EngineConfig(context=256, parallel=1, n_threads=2)
    with Engine(default_model_path, model_sha256="test", config=config) as engine:
        prompt = engine.model.tokenize("The history of computing. " * 40)[:200]

        async def fill() -> tuple[int, int]:
            sampling = SamplingParams(temperature=0.0, max_tokens=8)
            await engine.generate(GenerateRequest(prompt=prompt, sampling=sampling))
            state = await engine.export_slot(0)
            return len(state.payload), len(state.tokens)

        state_bytes, n_tokens = asyncio.run(fill())
    assert n_tokens >= 200
    estimate = per_token * n_tokens  # the planner's KV bytes for n_tokens cells
    assert abs(state_bytes - estimate) / estimate < 0.10


def test_open_engine_loads_with_the_plan(default_model_path: Path) -> None:
    registry = Registry.load()
    with open_engine(registry, None, parallel=1, n_threads=2) as engine:
        plan = engine.plan
        assert plan is not None
        assert plan.model == "smollm2-135m"
        assert plan.n_gpu_layers == 0 == engine.config.n_gpu_layers  # no GPU here
        assert plan.context == 2048 == engine.config.context  # the built-in entry's value
        assert plan.pinned == ("context",)  # models.toml sets it, so it is a pin
        assert (engine.config.type_k, engine.config.flash_attn) == ("f16", False)
        assert "CPU only" in plan.reason


def test_open_engine_flags_pin_and_win(default_model_path: Path) -> None:
    registry = Registry.load()
    engine = open_engine(
        registry, None, parallel=2, context=512, n_gpu_layers=4, type_k="q8_0", n_threads=2
    )
    with engine:
        plan = engine.plan
        assert plan is not None
        assert plan.pinned == ("n_gpu_layers", "context", "type_k")
        assert (plan.context, plan.parallel, plan.type_k, plan.type_v) == (512, 2, "q8_0", "f16")
        assert engine.config.n_gpu_layers == 4 and engine.config.type_k == "q8_0"
        assert any("every layer runs on the CPU" in note for note in plan.notes)
