"""The offload planner on synthetic machines, with every expected number worked out by hand.

The synthetic model is 7B-class (Mistral 7B's shape): 32 layers, embedding 4096, 32 heads,
8 KV heads, head dim 128, vocabulary 32,000; 128 MiB of weights per block, a 128 MiB output
head, 64 MiB of token embeddings and a 16 KiB output norm.

Figures used throughout (context 4096, one slot, n_batch 512, f16 KV, default margins):

- KV per layer = 4096 cells x (128 x 8 K + 128 x 8 V) x 2 bytes = 16 MiB = 16,777,216
- a GPU layer = 128 MiB weights + 16 MiB KV = 150,994,944; the output layer = 128 MiB
  head + 16,384 norm = 134,234,112
- graph, full offload (Ollama's llama formula, c = 4096, b = 512):
  max(4b(1 + 4e + c(1 + h)), 4b(e + vocab)) = max(2048 x 151,553, 2048 x 36,096)
  = 310,380,544
- graph, partial: 4be + max(4b(1 + e + max(c, e)) + e*e*9/16 + 4c(b*h + (e/h)*hkv),
  4b(e + vocab) + e*vocab*105/128) = 8,388,608 + max(16,779,264 + 9,437,184 +
  285,212,672, 73,924,608 + 107,520,000) = 319,817,728
- fit check per GPU: 457 MiB reserve (479,199,232) + one layer of buffer (150,994,944)
  + graph max(partial, full) (319,817,728), so 950,011,904 before any layer
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcrt.device.offload import (
    DeviceMemory,
    GpuMemory,
    ModelShape,
    PlanError,
    PlanRequest,
    flash_attn_for,
    graph_sizes,
    kv_bytes_per_layer,
    needs_flash_attn,
    plan_offload,
)
from pcrt.device.profile import BuildInfo, DeviceProfile, collect_profile
from pcrt.runtime.models.gguf_info import read_gguf_info
from pcrt.runtime.models.loader import kv_settings_for
from pcrt.runtime.models.planning import model_shape, plan_request
from pcrt.runtime.models.registry import ModelEntry, parse_source

MiB = 1024**2
GiB = 1024**3

SEVEN_B = ModelShape(
    name="synthetic-7b",
    architecture="llama",
    n_layers=32,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    head_dim_k=128,
    head_dim_v=128,
    n_vocab=32000,
    n_ctx_train=32768,
    layer_bytes=(128 * MiB,) * 32,
    output_bytes=128 * MiB,
    token_embd_bytes=64 * MiB,
    other_bytes=16384,
)
REQUEST = PlanRequest(context=4096)

KV_LAYER = 16_777_216
LAYER = 150_994_944  # 128 MiB + 16 MiB of KV
OUTPUT = 134_234_112  # 128 MiB head + 16,384 norm
GRAPH_FULL = 310_380_544
GRAPH_PARTIAL = 319_817_728
LOGITS = 128_000  # llama.cpp's output buffer: 4 bytes x 32,000 x 1 slot
WEIGHTS = 4_496_310_272  # 32 x 128 MiB + 128 MiB + 64 MiB + 16,384


def machine(ram: int, *gpu_free: int) -> DeviceMemory:
    gpus = tuple(
        GpuMemory(index=i, name=f"GPU{i}", free=free, total=free) for i, free in enumerate(gpu_free)
    )
    return DeviceMemory(ram_available=ram, ram_total=ram, gpus=gpus)


def test_hand_computed_building_blocks() -> None:
    assert kv_bytes_per_layer(SEVEN_B, 4096, 1, "f16", "f16") == KV_LAYER
    assert graph_sizes(SEVEN_B, cells=4096, batch=512) == (GRAPH_PARTIAL, GRAPH_FULL)
    assert SEVEN_B.weights_bytes == WEIGHTS
    assert SEVEN_B.output_layer_bytes == OUTPUT
    # q8_0 is 34 bytes per 32 elements, q4_0 18: one cell of one layer is 1,024 K + 1,024 V
    assert kv_bytes_per_layer(SEVEN_B, 4096, 1, "q8_0", "q8_0") == 4096 * 2 * 1088
    assert kv_bytes_per_layer(SEVEN_B, 4096, 1, "q4_0", "q4_0") == 4096 * 2 * 576
    # llama.cpp pads each slot's cells to 256: 300 tokens x 3 slots take 3 x 512 cells
    assert kv_bytes_per_layer(SEVEN_B, 300, 3, "f16", "f16") == 3 * 512 * 4096


def test_no_gpu_everything_in_ram() -> None:
    plan = plan_offload(SEVEN_B, machine(32 * GiB), REQUEST)
    assert plan.n_gpu_layers == 0 and plan.n_layers == 33
    assert plan.gpus == () and plan.tensor_split is None
    assert plan.context == 4096 and plan.kv_cells == 4096
    assert plan.ram.weights == WEIGHTS
    assert plan.ram.kv == 32 * KV_LAYER == 512 * MiB
    assert plan.ram.compute == GRAPH_FULL + LOGITS
    assert plan.ram.total == 5_343_689_728
    assert plan.kv_bytes == 512 * MiB and plan.weights_bytes == WEIGHTS
    assert plan.reason.startswith("CPU only (no GPU): 5.0 GiB in RAM of 32.0 GiB available")


def test_one_gpu_with_4_gib() -> None:
    # after the 950,011,904 of margins and graph, the output layer (134,234,112) leaves
    # 3,210,721,280: 21 layers of 150,994,944 (3,170,893,824) fit, 22 do not
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 4 * GiB), REQUEST)
    assert plan.n_gpu_layers == 22
    assert plan.tensor_split is None and plan.main_gpu == 0
    (gpu,) = plan.gpus
    assert gpu.layers == 22
    assert gpu.weights == OUTPUT + 21 * 128 * MiB == 2_952_806_400
    assert gpu.kv == 21 * KV_LAYER == 352_321_536
    assert gpu.compute == GRAPH_PARTIAL  # not every layer is on the GPU
    assert gpu.total == 3_624_945_664
    assert plan.ram.layers == 11
    assert plan.ram.weights == 11 * 128 * MiB + 64 * MiB == 1_543_503_872
    assert plan.ram.kv == 11 * KV_LAYER
    assert plan.ram.compute == GRAPH_FULL + LOGITS
    assert plan.reason.startswith(
        "22/33 layers on GPU 0 (GPU0): 3.4 GiB of 4.0 GiB; 11 layers and their KV in RAM"
    )


def test_one_gpu_with_2_gib() -> None:
    # 2 GiB - 950,011,904 - 134,234,112 = 1,063,237,632: 7 layers (1,056,964,608) fit
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 2 * GiB), REQUEST)
    assert plan.n_gpu_layers == 8
    (gpu,) = plan.gpus
    assert gpu.weights == OUTPUT + 7 * 128 * MiB == 1_073_758_208
    assert gpu.kv == 7 * KV_LAYER == 117_440_512
    assert gpu.compute == GRAPH_PARTIAL
    assert plan.ram.layers == 25
    assert plan.ram.weights == 25 * 128 * MiB + 64 * MiB


def test_one_gpu_with_24_gib_takes_everything() -> None:
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 24 * GiB), REQUEST)
    assert plan.n_gpu_layers == 33
    (gpu,) = plan.gpus
    assert gpu.weights == OUTPUT + 32 * 128 * MiB == 4_429_201_408
    assert gpu.kv == 32 * KV_LAYER == 536_870_912
    assert gpu.compute == GRAPH_FULL  # fully offloaded: the full-offload graph
    # RAM keeps the input layer (token embeddings) and the host side of the graph
    assert plan.ram.layers == 0
    assert plan.ram.weights == 64 * MiB
    assert plan.ram.kv == 0
    assert plan.ram.compute == 4 * 512 * 4096 + LOGITS == 8_516_608
    # 4,429,201,408 + 536,870,912 + 310,380,544 = 5,276,452,864 on the GPU
    assert gpu.total == 5_276_452_864
    assert plan.reason.startswith("33/33 layers on GPU 0 (GPU0): 4.9 GiB of 24.0 GiB; ")


def test_two_unequal_gpus() -> None:
    # Multi-GPU uses the partial graph on both (319,817,728): 950,011,904 before layers.
    # GPU 0 (2 GiB) takes the output layer then 7 blocks; GPU 1 (3 GiB) has room for
    # 2,271,213,568 = 15 blocks. Round-robin from the top: output -> GPU 0, 31 -> GPU 1,
    # 30 -> GPU 0, ... 18 -> GPU 0 (its 7th block, now full), 17 -> GPU 1; 16 does not fit
    # GPU 0, which drops out; GPU 1 takes 16 down to 10 (its 15th); 9 fits nowhere.
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 2 * GiB, 3 * GiB), REQUEST)
    assert plan.n_gpu_layers == 23
    assert plan.tensor_split == (8.0, 15.0)
    assert plan.main_gpu == 0
    gpu0, gpu1 = plan.gpus
    assert (gpu0.layers, gpu1.layers) == (8, 15)
    assert gpu0.weights == OUTPUT + 7 * 128 * MiB == 1_073_758_208
    assert gpu0.kv == 7 * KV_LAYER
    assert gpu1.weights == 15 * 128 * MiB == 2_013_265_920
    assert gpu1.kv == 15 * KV_LAYER == 251_658_240
    assert gpu0.compute == gpu1.compute == GRAPH_PARTIAL
    assert plan.ram.layers == 10
    assert plan.ram.weights == 10 * 128 * MiB + 64 * MiB
    assert plan.ram.kv == 10 * KV_LAYER
    assert plan.ram.compute == GRAPH_FULL + LOGITS  # the CPU's own graph, not the GPUs'
    # GPU 0: 1,073,758,208 + 117,440,512 + 319,817,728 = 1,511,016,448 (1.4 GiB)
    # GPU 1: 2,013,265,920 + 251,658,240 + 319,817,728 = 2,584,741,888 (2.4 GiB)
    assert (gpu0.total, gpu1.total) == (1_511_016_448, 2_584_741_888)
    assert plan.reason.startswith(
        "23/33 layers on 2 GPUs (GPU 0: 8 layers, 1.4 GiB of 2.0 GiB; "
        "GPU 1: 15 layers, 2.4 GiB of 3.0 GiB); 10 layers and their KV in RAM"
    )


def test_split_follows_device_indices() -> None:
    # GPU 0 errored and was left out of the profile: GPU 1 takes every layer, and the
    # split names it by index so llama.cpp puts nothing on device 0
    devices = DeviceMemory(
        ram_available=32 * GiB,
        ram_total=32 * GiB,
        gpus=(GpuMemory(index=1, name="GPU1", free=24 * GiB, total=24 * GiB),),
    )
    plan = plan_offload(SEVEN_B, devices, REQUEST)
    assert plan.n_gpu_layers == 33
    assert plan.main_gpu == 1 and plan.tensor_split == (0.0, 33.0)


def test_gpu_too_small_for_one_layer_is_skipped() -> None:
    # 1 GiB < 479,199,232 + 319,817,728 + 2 x 150,994,944 = 1,101,006,848
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 1 * GiB), REQUEST)
    assert plan.n_gpu_layers == 0 and plan.gpus == ()
    assert "no layer fits on a GPU" in plan.reason


def test_context_that_must_shrink() -> None:
    # CPU only, 6 GiB available, 512 MiB reserve: 5,905,580,032 to spend. At a context of
    # c >= 512 the RAM need is the weights 4,496,310,272 + KV 32 x 4096 x c = 131,072c
    # + graph 2048 x (16,385 + 33c) + 128,000 logits = 4,529,994,752 + 198,656c, so
    # c <= 6924.6: the largest multiple of 256 is 6912.
    plan = plan_offload(SEVEN_B, machine(6 * GiB), PlanRequest(context=32768))
    assert plan.context == 6912 and plan.context_requested == 32768
    assert plan.ram.total == 4_529_994_752 + 198_656 * 6912 == 5_903_105_024
    assert plan.kv_bytes == 131_072 * 6912
    assert any("context reduced from 32768 to 6912" in note for note in plan.notes)
    assert plan.reason.endswith("context 6912 of 32768 wanted")


def test_pinned_context_does_not_shrink() -> None:
    request = PlanRequest(context=32768, pinned=frozenset({"context"}))
    with pytest.raises(PlanError, match="pinned context 32768") as info:
        plan_offload(SEVEN_B, machine(6 * GiB), request)
    # 4,529,994,752 + 198,656 x 32,768 (6,509,559,808) = 11,039,554,560 needed
    assert info.value.needed == 11_039_554_560
    assert info.value.shortfall == 11_039_554_560 - 5_905_580_032


def test_model_that_cannot_fit() -> None:
    # 4 GiB - 512 MiB = 3,758,096,384 available; at the minimum context 1024 the model
    # needs 4,529,994,752 + 198,656 x 1024 = 4,733,418,496: 975,322,112 short (930.1 MiB)
    with pytest.raises(PlanError) as info:
        plan_offload(SEVEN_B, machine(4 * GiB), PlanRequest(context=8192))
    error = info.value
    assert error.context == 1024
    assert error.needed == 4_733_418_496
    assert error.available == 3_758_096_384
    assert error.shortfall == 975_322_112
    message = str(error)
    assert "synthetic-7b does not fit even at the minimum context 1024" in message
    assert "930.1 MiB short" in message


def test_a_gpu_lets_the_context_stay() -> None:
    # the same 4 GiB of RAM with a 24 GiB GPU: everything goes there, nothing shrinks
    plan = plan_offload(SEVEN_B, machine(4 * GiB, 24 * GiB), PlanRequest(context=8192))
    assert plan.context == 8192 and plan.n_gpu_layers == 33


def test_pinned_n_gpu_layers_is_honoured_and_reported() -> None:
    request = PlanRequest(context=4096, n_gpu_layers=30)
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 4 * GiB), request)
    assert plan.n_gpu_layers == 30 and plan.pinned == ("n_gpu_layers",)
    (gpu,) = plan.gpus
    assert gpu.layers == 30
    # 29 blocks + output + partial graph = 5,146,493,696 > 4 GiB free
    assert gpu.total == OUTPUT + 29 * LAYER + GRAPH_PARTIAL
    assert any("overcommits GPU 0" in note for note in plan.notes)
    # on a machine without a GPU the pin passes through, with a note
    cpu_plan = plan_offload(SEVEN_B, machine(32 * GiB), request)
    assert cpu_plan.n_gpu_layers == 30 and cpu_plan.gpus == ()
    assert any("every layer runs on the CPU" in note for note in cpu_plan.notes)


def test_quantised_v_cache_turns_flash_attention_on() -> None:
    plan = plan_offload(SEVEN_B, machine(32 * GiB), PlanRequest(context=4096, type_v="q8_0"))
    assert plan.flash_attn is True
    assert plan.kv_bytes == 32 * 4096 * (2048 + 1088)
    with pytest.raises(PlanError, match="needs flash attention"):
        plan_offload(
            SEVEN_B, machine(32 * GiB), PlanRequest(context=4096, type_v="q4_0", flash_attn=False)
        )


def test_context_capped_at_trained_length() -> None:
    plan = plan_offload(SEVEN_B, machine(64 * GiB), PlanRequest(context=100_000))
    assert plan.context == 32768
    assert "context capped at the model's trained length 32768" in plan.notes


def test_gpus_ignored_when_the_build_cannot_offload() -> None:
    devices = machine(32 * GiB, 24 * GiB).model_copy(
        update={"gpu_offload": False, "cpu_only_reason": "no GPU backend in this build"}
    )
    plan = plan_offload(SEVEN_B, devices, REQUEST)
    assert plan.n_gpu_layers == 0
    assert plan.reason.startswith("CPU only (no GPU backend in this build)")


def test_plan_key_tracks_what_the_engine_loads() -> None:
    a = plan_offload(SEVEN_B, machine(32 * GiB), REQUEST)
    b = plan_offload(SEVEN_B, machine(31 * GiB), REQUEST)  # other free RAM, same load
    c = plan_offload(SEVEN_B, machine(32 * GiB), PlanRequest(context=2048))
    assert a.key == b.key != c.key


# -- the real default model's metadata ---------------------------------------------------


def test_default_model_metadata(default_model_path: Path) -> None:
    """SmolLM2-135M: 30 layers, embedding 576, 9 heads, 3 KV heads of 64, 49,152 tokens,
    2,216,448 bytes per block, tied 30,081,024-byte embeddings, 2,304 bytes of norm."""
    shape = model_shape(read_gguf_info(default_model_path), "smollm2-135m")
    assert (shape.n_layers, shape.n_embd, shape.n_head, shape.n_head_kv) == (30, 576, 9, 3)
    assert (shape.head_dim_k, shape.head_dim_v, shape.n_vocab) == (64, 64, 49152)
    assert shape.layer_bytes == (2_216_448,) * 30
    assert shape.tied_embeddings and shape.output_bytes == 0
    assert (shape.token_embd_bytes, shape.other_bytes) == (30_081_024, 2304)

    # CPU, context 2048, 1 slot: KV = 2048 x (64 x 3 x 2 x 2) = 1,572,864 per layer;
    # graph = max(2048 x (1 + 2304 + 20,480), 2048 x (576 + 49,152)) = 101,842,944
    cpu = plan_offload(shape, machine(8 * GiB), PlanRequest(context=2048))
    assert cpu.n_gpu_layers == 0
    assert cpu.kv_bytes == 30 * 1_572_864 == 47_185_920
    assert cpu.ram.weights == 96_576_768
    assert cpu.ram.compute == 101_842_944 + 4 * 49152

    # a 2 GiB GPU takes all 31 layers; the tied head is copied there, embeddings stay
    gpu_plan = plan_offload(shape, machine(8 * GiB, 2 * GiB), PlanRequest(context=2048))
    assert gpu_plan.n_gpu_layers == 31
    (gpu,) = gpu_plan.gpus
    assert gpu.weights == 30 * 2_216_448 + 30_081_024 + 2304 == 96_576_768
    assert gpu.kv == 47_185_920 and gpu.compute == 101_842_944
    assert gpu_plan.ram.weights == 30_081_024
    assert gpu_plan.ram.compute == 4 * 512 * 576 + 4 * 49152
    assert gpu_plan.weights_bytes == 96_576_768 + 30_081_024


def test_profile_to_device_memory() -> None:
    profile = collect_profile(nvml=None)
    memory = DeviceMemory.from_profile(profile)
    assert memory.ram_available == profile.memory.available
    assert memory.gpus == () and memory.cpu_only_reason


def test_profile_with_metal_device_uses_the_backend_memory() -> None:
    base = collect_profile(nvml=None)
    build = BuildInfo.model_validate(
        {
            "llama_cpp_version": "0.3.36",
            "gpu_offload": True,
            "backends": ["Metal", "CPU"],
            "system_info": "Metal : EMBED_LIBRARY = 1 |",
            "devices": [
                {
                    "name": "Metal",
                    "description": "Apple M2",
                    "type": "gpu",
                    "memory_free": 10 * GiB,
                    "memory_total": 12 * GiB,
                }
            ],
        }
    )
    profile = DeviceProfile.model_validate({**base.model_dump(), "build": build.model_dump()})
    assert not profile.cpu_only
    memory = DeviceMemory.from_profile(profile)
    assert memory.gpus == (
        GpuMemory(index=0, name="Apple M2", free=10 * GiB, total=12 * GiB, library="metal"),
    )
    plan = plan_offload(SEVEN_B, memory.model_copy(update={"ram_available": 16 * GiB}), REQUEST)
    # Metal has no partial-offload overhead: the full graph (310,380,544) is used for fits
    assert plan.n_gpu_layers == 33 and plan.gpus[0].compute == GRAPH_FULL


# -- pins from entries and flags -------------------------------------------------------


def _entry(**fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"name": "m", "source": parse_source("/tmp/m.gguf"), **fields})


def test_entry_and_flag_pins() -> None:
    # an entry without a context wants the default and lets the planner shrink it
    request = plan_request(_entry())
    assert request.context == 4096 and request.pinned == frozenset()
    assert request.n_gpu_layers is None and request.flash_attn is None
    # what models.toml sets is pinned
    request = plan_request(_entry(context=8192, kv_type="q8_0", n_gpu_layers=12))
    assert request.pinned == {"context", "type_k", "type_v"}
    assert (request.type_k, request.type_v, request.n_gpu_layers) == ("q8_0", "q8_0", 12)
    # flags win over the entry and are pins too
    request = plan_request(
        _entry(context=8192, n_gpu_layers=12), context=1024, n_gpu_layers=0, parallel=4
    )
    assert (request.context, request.n_gpu_layers, request.parallel) == (1024, 0, 4)
    plan = plan_offload(SEVEN_B, machine(32 * GiB, 24 * GiB), request)
    assert plan.pinned == ("n_gpu_layers", "context")
    assert plan.n_gpu_layers == 0 and "n_gpu_layers pinned to 0" in plan.reason


@pytest.mark.parametrize("kv_type", [None, "f16", "f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("flash_attn", [None, True, False])
def test_kv_settings_agree_with_the_plan(kv_type: str | None, flash_attn: bool | None) -> None:
    # peers compare kv_settings_for's answer before sending KV states: it must be what the
    # plan loads, or the planner's refusal of a quantised V cache with flash attention off
    entry = _entry(kv_type=kv_type, flash_attn=flash_attn)
    type_k, type_v, flash = kv_settings_for(entry)
    request = plan_request(entry)
    assert (flash, type_v) == (flash_attn_for(type_v, flash_attn), request.type_v)
    if needs_flash_attn(type_v) and flash_attn is False:
        with pytest.raises(PlanError, match="needs flash attention, which is pinned off"):
            plan_offload(SEVEN_B, machine(32 * GiB), request)
        return
    plan = plan_offload(SEVEN_B, machine(32 * GiB), request)
    assert (plan.type_k, plan.type_v, plan.flash_attn) == (type_k, type_v, flash)
    noted = any(note.startswith("flash attention on") for note in plan.notes)
    assert noted == (needs_flash_attn(type_v) and flash_attn is None)
