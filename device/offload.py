"""The offload planner: how many layers go to which GPU, and how much context fits.

Pure functions over plain data: a ``ModelShape`` (GGUF metadata and per-tensor byte
counts; ``pcrt.runtime.models.planning`` builds it from a GGUF file), a ``DeviceMemory`` (free
RAM and VRAM; ``DeviceMemory.from_profile`` reads a ``DeviceProfile``), a ``PlanRequest``
(wanted context, slots, KV types, pins) and ``PlanMargins``. No I/O, no llama.cpp.

The method is Ollama's per-layer fit (``llm/memory.go``, ``EstimateGPULayers``, and the
graph sizes of ``fs/ggml/ggml.go``, ``GraphSize``), adapted to how llama.cpp places layers
and to how pcrt's engine allocates its KV cache:

- a layer's size is its weights (the ``blk.N.*`` tensors) plus its share of the KV cache;
  KV bytes per layer = cells x (n_embd_head_k + n_embd_head_v) x n_head_kv x bytes per
  element (Ollama's formula; bytes per element from ggml's block layout, so q8_0 is 34/32
  and q4_0 18/32 where Ollama rounds to 1 and 0.5);
- KV cells: pcrt gives each slot its own stream of ``context`` cells, which llama.cpp pads
  to a multiple of 256, so cells = pad256(context) x parallel (measured: context 300 gives
  512 cells per slot);
- llama.cpp offloads the *last* ``n_gpu_layers`` of n_layer + 1 layers, the +1 being the
  output layer (``llama-model.cpp``: ``i_gpu_start = n_layer + 1 - n_gpu_layers``), so
  layers are placed from the output down, while each fits beside the reserve, one layer of
  buffer and the compute graph (Ollama's checks); the first that does not fit ends the
  walk, which keeps the GPU layers contiguous as llama.cpp needs;
- several GPUs take layers round-robin (Ollama's ``i % j`` walk, dropping a GPU when a
  layer does not fit on it); ``tensor_split`` is each GPU's layer count;
- the compute graph uses Ollama's per-architecture formulas with the context term taken
  per slot, because pcrt's streams are separate (llama.cpp's CPU compute buffer for the
  default model at contexts 256, 512, 2048, 8192 came within 2% of the full-offload
  figure); architectures Ollama has no formula for use the llama one, a general
  transformer estimate, where Ollama falls back to GQA x KV / 6;
- the context shrinks (never below ``PlanMargins.min_context``, never when pinned) only
  when RAM + VRAM cannot hold it; what does not fit even then is a ``PlanError`` naming
  the shortfall.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from pcrt.device.units import MiB, format_bytes

if TYPE_CHECKING:
    from pcrt.device.profile import DeviceProfile

__all__ = [
    "KV_CELL_PADDING",
    "PINNABLE",
    "GpuMemory",
    "GpuPlacement",
    "KVType",
    "DeviceMemory",
    "ModelShape",
    "OffloadPlan",
    "PlanError",
    "PlanMargins",
    "PlanRequest",
    "RamPlacement",
    "flash_attn_for",
    "graph_sizes",
    "kv_bytes_per_layer",
    "kv_cells",
    "needs_flash_attn",
    "plan_offload",
    "row_bytes",
]


KV_CELL_PADDING = 256
"""llama.cpp rounds each sequence's KV cells up to a multiple of this."""

KVType = Literal["f32", "f16", "q8_0", "q4_0"]

# ggml's block layout (ggml.c type_traits): elements per block, bytes per block
_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
}

PINNABLE = ("n_gpu_layers", "context", "type_k", "type_v", "flash_attn")


def needs_flash_attn(type_v: str) -> bool:
    """llama.cpp needs flash attention for a V cache other than f16 or f32."""
    return type_v not in ("f16", "f32")


def flash_attn_for(type_v: str, pinned: bool | None) -> bool:
    """Whether a load with a ``type_v`` V cache runs flash attention: ``pinned`` when set,
    else on exactly when llama.cpp needs it (``needs_flash_attn``). A pin off with such a V
    cache stays off here; ``plan_offload`` refuses that combination. The planner and
    ``pcrt.runtime.models.loader.kv_settings_for`` both decide by this, so they agree."""
    return pinned if pinned is not None else needs_flash_attn(type_v)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelShape(_Frozen):
    """What the planner needs to know about a model (from its GGUF header)."""

    name: str = ""
    architecture: str
    n_layers: int = Field(ge=1)
    """Repeating blocks (``block_count``); the output layer comes on top."""
    n_embd: int = Field(ge=1)
    n_head: int = Field(ge=1)
    n_head_kv: int = Field(ge=0)
    head_dim_k: int = Field(ge=0)
    head_dim_v: int = Field(ge=0)
    n_vocab: int = Field(ge=1)
    n_ctx_train: int | None = None
    layer_bytes: tuple[int, ...]
    """Weights of ``blk.N.*``, N = 0 .. n_layers - 1."""
    output_bytes: int = 0
    """``output.weight``; 0 when the head is tied to the token embeddings."""
    token_embd_bytes: int
    other_bytes: int = 0
    """Output norm, rope factors and the like: they travel with the output layer."""
    tied_embeddings: bool = False

    @model_validator(mode="after")
    def _check_layers(self) -> ModelShape:
        if len(self.layer_bytes) != self.n_layers:
            raise ValueError(
                f"layer_bytes has {len(self.layer_bytes)} entries for {self.n_layers} layers"
            )
        return self

    @property
    def weights_bytes(self) -> int:
        """Every tensor once: the file's tensor data, and what a CPU-only load maps."""
        return sum(self.layer_bytes) + self.output_bytes + self.token_embd_bytes + self.other_bytes

    @property
    def output_layer_bytes(self) -> int:
        """What offloading the output layer puts on a GPU: the head (a copy of the token
        embeddings when tied: llama.cpp duplicates the tensor) plus the output norm."""
        head = self.token_embd_bytes if self.tied_embeddings else self.output_bytes
        return head + self.other_bytes


class GpuMemory(_Frozen):
    index: int
    name: str
    free: int
    total: int
    library: str = "cuda"
    """``metal`` changes the graph estimate (no partial-offload overhead)."""


class DeviceMemory(_Frozen):
    """The memory the planner may use: available RAM and each usable GPU's free VRAM."""

    ram_available: int
    ram_total: int
    gpus: tuple[GpuMemory, ...] = ()
    gpu_offload: bool = True
    """False when this llama.cpp build cannot offload (its GPUs are then ignored)."""
    cpu_only_reason: str | None = None

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> DeviceMemory:
        """NVML's GPUs (free memory as the driver sees it), else the GPU devices llama.cpp's
        own backends list (Metal, Vulkan: no NVML there)."""
        gpus: list[GpuMemory] = [
            GpuMemory(index=g.index, name=g.name, free=g.memory_free, total=g.memory_total)
            for g in profile.gpu.gpus
        ]
        if not gpus:
            devices = [d for d in profile.build.devices if d.type in ("gpu", "igpu")]
            for i, dev in enumerate(devices):
                if dev.memory_free is None or dev.memory_total is None:
                    continue
                library = "metal" if dev.name.lower().startswith("metal") else dev.name.lower()
                gpus.append(
                    GpuMemory(
                        index=i,
                        name=dev.description,
                        free=dev.memory_free,
                        total=dev.memory_total,
                        library=library,
                    )
                )
        return cls(
            ram_available=profile.memory.available,
            ram_total=profile.memory.total,
            gpus=tuple(gpus),
            gpu_offload=profile.build.gpu_offload,
            cpu_only_reason=profile.cpu_only_reason,
        )


class PlanMargins(_Frozen):
    """Safety margins; the daemon's settings may override each."""

    gpu_reserve: int = 457 * MiB
    """Left free on every GPU: Ollama's ``cudaMinimumMemory`` (``gpu/gpu.go``, later
    ``discover/gpu.go``), which it keeps free on every CUDA and ROCm device."""
    ram_reserve: int = 512 * MiB
    """Left free in RAM for the OS, the daemon and page cache churn."""
    min_context: int = Field(default=1024, ge=64)
    """The context is never shrunk below this (a smaller wanted context stays as asked)."""
    context_step: int = Field(default=KV_CELL_PADDING, ge=1)
    """A shrunk context is a multiple of this."""
    layer_buffer: bool = True
    """Keep one extra layer's worth free on each GPU, as Ollama does."""


class PlanRequest(_Frozen):
    """What the caller wants. ``pinned`` names the values the planner must not change."""

    context: int = Field(ge=1)
    """Per slot (each slot has its own KV stream)."""
    parallel: int = Field(default=1, ge=1)
    n_batch: int = Field(default=512, ge=1)
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    flash_attn: bool | None = None
    """None: the planner decides (off, unless a quantised V cache needs it)."""
    n_gpu_layers: int | None = Field(default=None, ge=0)
    """None: as many as fit. A number is a pin: placed as asked, even past free memory."""
    pinned: frozenset[str] = frozenset()
    """Of ``context``, ``type_k``, ``type_v``, ``flash_attn``, ``n_gpu_layers``."""

    @model_validator(mode="after")
    def _check_pins(self) -> PlanRequest:
        unknown = set(self.pinned) - set(PINNABLE)
        if unknown:
            raise ValueError(f"cannot pin {sorted(unknown)}; pinnable: {', '.join(PINNABLE)}")
        return self


class _Placement(_Frozen):
    weights: int
    kv: int
    compute: int
    """Compute graph (and, in RAM, llama.cpp's logits buffer)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


class GpuPlacement(_Placement):
    index: int
    name: str
    layers: int
    free: int


class RamPlacement(_Placement):
    layers: int
    """Repeating blocks (plus the output layer) that run on the CPU."""
    available: int


class OffloadPlan(_Frozen):
    """How to load one model on one machine, with the estimates behind it."""

    model: str
    n_gpu_layers: int
    n_layers: int
    """Offloadable layers: blocks + the output layer (llama.cpp's n_layer + 1)."""
    tensor_split: tuple[float, ...] | None
    """Layers per GPU by device index (llama.cpp's ``tensor_split``); None when all of
    them go to GPU 0 or nothing is offloaded."""
    main_gpu: int
    """Device index of the first GPU with layers."""
    context: int
    """Granted context per slot."""
    context_requested: int
    kv_cells: int
    """KV cells per slot llama.cpp allocates (``context`` padded to 256)."""
    parallel: int
    n_batch: int
    type_k: KVType
    type_v: KVType
    flash_attn: bool
    gpus: tuple[GpuPlacement, ...]
    ram: RamPlacement
    kv_bytes: int
    """The whole KV cache, every slot, every device."""
    weights_bytes: int
    """Weights on every device (a tied output head offloaded counts twice, as loaded)."""
    pinned: tuple[str, ...]
    reason: str
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Hash of what the engine is loaded with: benchmarks of one plan compare."""
        fields = {
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": self.tensor_split,
            "main_gpu": self.main_gpu,
            "context": self.context,
            "parallel": self.parallel,
            "n_batch": self.n_batch,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,
        }
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class PlanError(Exception):
    """The model does not fit (or the request contradicts itself). Says by how much."""

    def __init__(
        self,
        message: str,
        *,
        context: int | None = None,
        needed: int = 0,
        available: int = 0,
    ) -> None:
        super().__init__(message)
        self.context = context
        self.needed = needed
        self.available = available

    @property
    def shortfall(self) -> int:
        return max(0, self.needed - self.available)


# -- sizes ------------------------------------------------------------------------------


def row_bytes(kv_type: KVType, n_elements: int) -> int:
    """ggml_row_size: bytes of ``n_elements`` of ``kv_type``."""
    per_block, block_bytes = _BLOCKS[kv_type]
    return -(-n_elements // per_block) * block_bytes


def kv_cells(context: int) -> int:
    return -(-context // KV_CELL_PADDING) * KV_CELL_PADDING


def kv_bytes_per_layer(
    shape: ModelShape, context: int, parallel: int, type_k: KVType, type_v: KVType
) -> int:
    """KV bytes of one layer for ``parallel`` slots of ``context`` tokens each.

    Ollama (``fs/ggml/ggml.go``, GraphSize): context x (n_embd_head_k + n_embd_head_v) x
    n_head_kv x bytes per element; here per K and V row as llama.cpp allocates them.
    """
    cells = kv_cells(context) * parallel
    k = row_bytes(type_k, shape.head_dim_k * shape.n_head_kv)
    v = row_bytes(type_v, shape.head_dim_v * shape.n_head_kv)
    return cells * (k + v)


def graph_sizes(shape: ModelShape, cells: int, batch: int) -> tuple[int, int]:
    """(partial, full) offload compute graph bytes: Ollama's ``GraphSize`` formulas
    (``fs/ggml/ggml.go``) for llama, qwen2 and gemma; ``cells`` is one slot's KV cells."""
    e, h, hkv, v = shape.n_embd, shape.n_head, shape.n_head_kv, shape.n_vocab
    c, b = cells, batch
    eh = e // h  # embeddingHeads
    ehk = shape.head_dim_k
    arch = shape.architecture
    if arch in ("gemma", "gemma2", "gemma3", "gemma3n"):
        full = max(4 * b * (e + v), 4 * b * (2 + c + c * h + 2 * e + 2 * ehk * h))
        partial = max(
            4 * e * b + e * v * 105 // 128 + 4 * v * b,
            4 * b * (2 * e + 1 + 2 * ehk * h + c + c * h) + 4 * ehk * c * 8 + e * ehk * h * 9 // 16,
        )
        if arch == "gemma3n":
            full, partial = full * 4, partial * 4
        return partial, full
    if arch == "qwen2":
        full = max(4 * b * (e + v), 4 * b * (1 + 2 * e + c + c * h))
        partial = max(
            4 * b * (e + v) + e * v * 105 // 128,
            4 * (b * (1 + 2 * e + c * (1 + h)) + e * (1 + c)),
        )
        return partial, full
    # "llama" in Ollama; pcrt's default for every other transformer
    full = max(4 * b * (1 + 4 * e + c * (1 + h)), 4 * b * (e + v))
    partial = 4 * b * e + max(
        4 * b * (1 + e + max(c, e)) + e * e * 9 // 16 + 4 * c * (b * h + eh * hkv),
        4 * b * (e + v) + e * v * 105 // 128,
    )
    return partial, full


# -- the fit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    context: int
    cells: int
    kv_layer: int
    graph_partial: int
    graph_full: int
    on_gpu: dict[int, int]
    """Layer index (n_layers = the output layer) -> position in the GPU list."""
    gpus: tuple[GpuPlacement, ...]
    ram: RamPlacement
    over_gpu: tuple[str, ...]
    """GPUs a pinned n_gpu_layers overcommits, described."""

    @property
    def ram_needed(self) -> int:
        return self.ram.total


def _layout(
    shape: ModelShape,
    devices: DeviceMemory,
    req: PlanRequest,
    margins: PlanMargins,
    context: int,
) -> _Layout:
    n = shape.n_layers
    cells = kv_cells(context)
    kv_layer = kv_bytes_per_layer(shape, context, req.parallel, req.type_k, req.type_v)
    batch = min(context * req.parallel, req.n_batch)
    partial, full = graph_sizes(shape, cells, batch)
    cpu_graph = full  # what the CPU backend runs when it has the whole model
    gpus = devices.gpus if devices.gpu_offload else ()
    if len(gpus) > 1:
        full = partial  # Ollama: multi-GPU always uses the partial graph size
    elif gpus and gpus[0].library == "metal":
        partial = full  # Ollama: on Metal there is no partial-offload overhead
    graph = max(partial, full)

    def size(i: int) -> int:
        return shape.output_layer_bytes if i == n else shape.layer_bytes[i] + kv_layer

    pinned = req.n_gpu_layers is not None
    target = n + 1 if req.n_gpu_layers is None else min(req.n_gpu_layers, n + 1)
    on_gpu: dict[int, int] = {}
    alloc = [0] * len(gpus)
    if gpus and target > 0:
        buffer = shape.layer_bytes[0] + kv_layer if margins.layer_buffer else 0
        if pinned:
            with_space = list(range(len(gpus)))
        else:
            # Ollama: only GPUs that hold the reserve, the graph and the buffer plus a layer
            need = margins.gpu_reserve + graph + 2 * buffer
            with_space = [g for g, gpu in enumerate(gpus) if gpu.free >= need]
            for g in with_space:
                alloc[g] = margins.gpu_reserve + buffer
        for i in range(n, -1, -1):  # the output layer, then blocks from the last down
            if len(on_gpu) >= target or not with_space:
                break
            j = len(with_space)
            while j > 0:
                g = with_space[i % j]
                if pinned or gpus[g].free > alloc[g] + graph + size(i):
                    alloc[g] += size(i)
                    on_gpu[i] = g
                    break
                with_space.pop(i % j)
                j -= 1
            if i not in on_gpu:
                break  # llama.cpp offloads a contiguous run from the top: stop here

    fully = len(on_gpu) == n + 1
    placements = []
    over: list[str] = []
    for g, gpu in enumerate(gpus):
        mine = [i for i, pos in on_gpu.items() if pos == g]
        blocks = [i for i in mine if i < n]
        weights = sum(shape.layer_bytes[i] for i in blocks)
        if n in mine:
            weights += shape.output_layer_bytes
        compute = (full if fully else partial) if mine else 0
        placement = GpuPlacement(
            index=gpu.index,
            name=gpu.name,
            layers=len(mine),
            free=gpu.free,
            weights=weights,
            kv=kv_layer * len(blocks),
            compute=compute,
        )
        placements.append(placement)
        if mine and placement.total + margins.gpu_reserve > gpu.free:
            over.append(
                f"GPU {gpu.index}: {format_bytes(placement.total)} planned + "
                f"{format_bytes(margins.gpu_reserve)} reserve > {format_bytes(gpu.free)} free"
            )

    cpu_blocks = [i for i in range(n) if i not in on_gpu]
    ram_weights = sum(shape.layer_bytes[i] for i in cpu_blocks) + shape.token_embd_bytes
    if n not in on_gpu:  # the output layer runs on the CPU (a tied head reuses token_embd)
        ram_weights += shape.other_bytes + shape.output_bytes
    # fully offloaded, only the input embeddings stay on the host; otherwise count the
    # whole graph (conservative: the CPU side may run most of it)
    ram_compute = 4 * batch * shape.n_embd if fully else cpu_graph
    ram_compute += 4 * shape.n_vocab * req.parallel  # llama.cpp's logits buffer
    ram = RamPlacement(
        layers=len(cpu_blocks) + (0 if n in on_gpu else 1),
        available=devices.ram_available,
        weights=ram_weights,
        kv=kv_layer * len(cpu_blocks),
        compute=ram_compute,
    )
    return _Layout(
        context=context,
        cells=cells,
        kv_layer=kv_layer,
        graph_partial=partial,
        graph_full=full,
        on_gpu=on_gpu,
        gpus=tuple(placements),
        ram=ram,
        over_gpu=tuple(over),
    )


def plan_offload(
    shape: ModelShape,
    devices: DeviceMemory,
    request: PlanRequest,
    margins: PlanMargins | None = None,
) -> OffloadPlan:
    """The best CPU/GPU split for ``shape`` on ``devices``; ``PlanError`` when none fits."""
    margins = margins or PlanMargins()
    notes: list[str] = []
    pinned = set(request.pinned)
    if request.n_gpu_layers is not None:
        pinned.add("n_gpu_layers")
    if request.flash_attn is not None:
        pinned.add("flash_attn")

    flash_attn = flash_attn_for(request.type_v, request.flash_attn)
    if needs_flash_attn(request.type_v):
        if not flash_attn:
            raise PlanError(
                f"a {request.type_v} V cache needs flash attention, which is pinned off: "
                "pin flash_attn on or use an f16 KV cache"
            )
        if request.flash_attn is None:
            notes.append(f"flash attention on: llama.cpp needs it for a {request.type_v} V cache")
    request = request.model_copy(update={"flash_attn": flash_attn})

    wanted = request.context
    if shape.n_ctx_train and wanted > shape.n_ctx_train:
        wanted = shape.n_ctx_train
        notes.append(f"context capped at the model's trained length {shape.n_ctx_train}")
    budget = devices.ram_available - margins.ram_reserve

    def layout(context: int) -> _Layout:
        return _layout(shape, devices, request, margins, context)

    best = asked = layout(wanted)
    if best.ram_needed > budget:
        floor = min(margins.min_context, wanted)
        if "context" in pinned:
            _fail(shape, best, budget, margins, "pinned")
        smallest = layout(floor)
        if smallest.ram_needed > budget:
            _fail(shape, smallest, budget, margins, "the minimum")
        # the largest multiple of context_step in (floor, wanted) that fits; memory grows
        # with the context, so a binary search over the steps finds it
        step = margins.context_step
        lo, hi = floor // step + 1, (wanted - 1) // step  # candidate multipliers
        best = smallest
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = layout(mid * step)
            if trial.ram_needed <= budget:
                best, lo = trial, mid + 1
            else:
                hi = mid - 1
        notes.append(
            f"context reduced from {wanted} to {best.context}: {wanted} needs "
            f"{format_bytes(asked.ram_needed)} of RAM, "
            f"{format_bytes(budget)} available after the reserve"
        )
    notes.extend(f"pinned n_gpu_layers overcommits {text}" for text in best.over_gpu)

    n_total = shape.n_layers + 1
    gpus = devices.gpus if devices.gpu_offload else ()
    n_gpu = len(best.on_gpu)
    if request.n_gpu_layers is not None and not gpus and request.n_gpu_layers > 0:
        notes.append(
            f"n_gpu_layers pinned to {request.n_gpu_layers}, but "
            f"{devices.cpu_only_reason or 'there is no GPU'}: every layer runs on the CPU"
        )
    plan_gpus = best.gpus if n_gpu else ()
    main_gpu = next((p.index for p in plan_gpus if p.layers), 0)
    tensor_split: tuple[float, ...] | None = None
    if plan_gpus and (len(plan_gpus) > 1 or plan_gpus[0].index != 0):
        # by device index, so a GPU left out of the list (it errored) gets no layers
        split = [0.0] * (max(p.index for p in plan_gpus) + 1)
        for p in plan_gpus:
            split[p.index] = float(p.layers)
        tensor_split = tuple(split)
    return OffloadPlan(
        model=shape.name,
        n_gpu_layers=request.n_gpu_layers if request.n_gpu_layers is not None else n_gpu,
        n_layers=n_total,
        tensor_split=tensor_split,
        main_gpu=main_gpu,
        context=best.context,
        context_requested=request.context,
        kv_cells=best.cells,
        parallel=request.parallel,
        n_batch=request.n_batch,
        type_k=request.type_k,
        type_v=request.type_v,
        flash_attn=flash_attn,
        gpus=plan_gpus,
        ram=best.ram,
        kv_bytes=best.kv_layer * shape.n_layers,
        weights_bytes=best.ram.weights + sum(p.weights for p in plan_gpus),
        pinned=tuple(p for p in PINNABLE if p in pinned),
        reason=_reason(best, n_total, devices, request, wanted),
        notes=tuple(notes),
    )


def _fail(
    shape: ModelShape, layout: _Layout, budget: int, margins: PlanMargins, which: str
) -> NoReturn:
    on_gpu = sum(p.total for p in layout.gpus if p.layers)
    gpu_text = f" besides {format_bytes(on_gpu)} on the GPU" if on_gpu else ""
    short = layout.ram_needed - budget
    raise PlanError(
        f"{shape.name or 'the model'} does not fit even at {which} context {layout.context}: "
        f"it needs {format_bytes(layout.ram_needed)} of RAM{gpu_text} "
        f"(weights {format_bytes(layout.ram.weights)}, KV {format_bytes(layout.ram.kv)}, "
        f"compute {format_bytes(layout.ram.compute)}), and {format_bytes(max(budget, 0))} is "
        f"available after a {format_bytes(margins.ram_reserve)} reserve: "
        f"{format_bytes(short)} short"
        + ("; lower the pinned context or unpin it" if which == "pinned" else ""),
        context=layout.context,
        needed=layout.ram_needed,
        available=budget,
    )


def _reason(
    layout: _Layout, n_total: int, devices: DeviceMemory, req: PlanRequest, wanted: int
) -> str:
    n_gpu = len(layout.on_gpu)
    ram = layout.ram
    ram_text = f"{format_bytes(ram.total)} in RAM of {format_bytes(ram.available)} available"
    if n_gpu == 0:
        if req.n_gpu_layers == 0:
            why = "n_gpu_layers pinned to 0"
        elif devices.cpu_only_reason or not devices.gpu_offload or not devices.gpus:
            why = devices.cpu_only_reason or "no GPU"
        else:
            why = "no layer fits on a GPU"
        text = f"CPU only ({why}): {ram_text}"
    else:
        used = [p for p in layout.gpus if p.layers]
        where = "; ".join(
            f"GPU {p.index}: {p.layers} layers, {format_bytes(p.total)} of {format_bytes(p.free)}"
            for p in used
        )
        if len(used) == 1:
            p = used[0]
            where = f"GPU {p.index} ({p.name}): {format_bytes(p.total)} of {format_bytes(p.free)}"
        else:
            where = f"{len(used)} GPUs ({where})"
        text = f"{n_gpu}/{n_total} layers on {where}"
        text += f"; {n_total - n_gpu} layers and their KV in RAM" if n_gpu < n_total else ""
        text += f"; {ram_text}"
    if layout.context < wanted:
        text += f"; context {layout.context} of {wanted} wanted"
    return text
