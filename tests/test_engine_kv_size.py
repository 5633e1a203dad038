"""One KV-size formula: the engine's ``kv_bytes`` (``pcrt ps``) is the device planner's
``kv_bytes`` (``pcrt device plan``) for the same model, context and slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcrt.device.offload import DeviceMemory, KVType, PlanRequest, plan_offload
from pcrt.runtime.engine import Engine, EngineConfig
from pcrt.runtime.models.gguf_info import read_gguf_info
from pcrt.runtime.models.planning import model_shape
from tests.tiny_model import write_tiny_llama

GiB = 1024**3
PLENTY = DeviceMemory(ram_available=64 * GiB, ram_total=64 * GiB)


def planner_kv_bytes(
    path: Path, context: int, parallel: int, type_k: KVType = "f16", type_v: KVType = "f16"
) -> int:
    request = PlanRequest(context=context, parallel=parallel, type_k=type_k, type_v=type_v)
    plan = plan_offload(model_shape(read_gguf_info(path)), PLENTY, request)
    assert (plan.context, plan.parallel) == (context, parallel)  # nothing shrunk or capped
    return plan.kv_bytes


def engine_kv_bytes(path: Path, config: EngineConfig) -> int:
    with Engine(path, model_sha256="test", config=config) as engine:
        assert engine.context_per_slot == config.context
        return engine.kv_bytes


@pytest.mark.parametrize(
    ("context", "parallel", "type_k"), [(256, 1, "f16"), (300, 2, "q8_0"), (2048, 4, "f16")]
)
def test_the_engine_reports_the_planners_kv_bytes(
    default_model_path: Path, context: int, parallel: int, type_k: KVType
) -> None:
    config = EngineConfig(context=context, parallel=parallel, n_threads=1, type_k=type_k)
    assert engine_kv_bytes(default_model_path, config) == planner_kv_bytes(
        default_model_path, context, parallel, type_k
    )


def test_heads_wider_than_n_embd_over_n_head_count_as_the_gguf_says(tmp_path: Path) -> None:
    """Key and value heads of 16 where n_embd / n_head is 4 (as Gemma 3's 256-wide heads):
    the engine reads them from the GGUF metadata, as the planner does, and both give the
    same figure; n_embd / n_head, the engine's old head size, would give a quarter."""
    path = write_tiny_llama(tmp_path / "wide.gguf", n_embd=8, n_head=2, n_head_kv=1, head_dim=16)
    info = read_gguf_info(path)
    assert (info.key_length, info.value_length) == (16, 16)
    config = EngineConfig(context=100, parallel=2, n_threads=1)
    ours = engine_kv_bytes(path, config)
    assert ours == planner_kv_bytes(path, 100, 2)
    # 2 layers x 2 slots x 256 cells (100 padded) x (K + V rows of 1 head x 16 f16)
    assert ours == 2 * 2 * 256 * (2 * 16 * 2)
    narrow = write_tiny_llama(tmp_path / "narrow.gguf", n_embd=8, n_head=2, n_head_kv=1)
    assert engine_kv_bytes(narrow, config) == planner_kv_bytes(narrow, 100, 2) == ours // 4
