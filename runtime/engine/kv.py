"""A slot's KV: export, restore, copy and trim one sequence; and the KV cache's size.

``SlotKV`` runs on the scheduler thread (it owns the llama.cpp context), between decode
steps. Every change to a sequence's KV goes with the same change to ``Slot.tokens``.

Why a copy between slots goes through sequence state (``llama_state_seq_get_data`` then
``llama_state_seq_set_data``) and not ``llama_memory_seq_cp``: each slot has its own KV
stream (``kv_unified`` off, see ``scheduler``), and a cross-stream ``seq_cp`` is deferred
to the next decode and only allowed for whole sequences, where get-then-set is
synchronous and exact. It moves the whole sequence (about 1/18 of recomputing it per
token, measured), which is why ``prefix`` weighs a copy against what it saves.

An exported state is the engine-independent ``KVState`` (``state``): for plain KV caches
the ``portable`` layout, which imports into an engine with any ``parallel``; for
sliding-window, recurrent and hybrid caches llama.cpp's raw bytes, tied to the stream
count.

``kv_cache_bytes`` is the size of the whole cache by the device planner's formula
(``pcrt.device.offload.kv_bytes_per_layer``: cells padded per stream, ggml row sizes), on
a shape built from what llama.cpp and the GGUF say, so ``pcrt ps`` and ``pcrt device plan``
give one figure.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import llama_cpp

from pcrt.device.offload import KVType, ModelShape, kv_bytes_per_layer
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.engine.slots import Slot
from pcrt.runtime.engine.state import CompatKey, KVState, native_payload, portable_payload
from pcrt.runtime.errors import ContextLengthExceeded, StateError

__all__ = ["SlotKV", "has_portable_state", "kv_cache_bytes", "kv_shape"]


def has_portable_state(model: LlamaModel) -> bool:
    """True when the model's sequence state is one plain KV section (``portable`` layout)."""
    return not (
        llama_cpp.llama_model_n_swa(model.ptr) > 0
        or llama_cpp.llama_model_is_recurrent(model.ptr)
        or llama_cpp.llama_model_is_hybrid(model.ptr)
    )


class SlotKV:
    """The KV of the context's sequences, one per slot. Scheduler thread only."""

    def __init__(
        self,
        ctx: Any,
        *,
        compat_key: CompatKey,
        n_stream: int,
        portable: bool,
        context_per_slot: int,
        model_name: str,
    ) -> None:
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.compat_key = compat_key
        self._n_stream = n_stream
        self.portable = portable
        self.context_per_slot = context_per_slot
        self._model_name = model_name

    @property
    def framing_bytes(self) -> int:
        """Bytes llama.cpp's framing adds before a portable payload (``native_payload``)."""
        return 12 + 4 * (self._n_stream - 1)

    def export(self, slot: Slot, next_token: int | None) -> KVState:
        """The slot's KV and tokens as a state (``next_token``: sampled, not decoded)."""
        return KVState(
            key=self.compat_key,
            tokens=list(slot.tokens),
            next_token=next_token,
            payload=self.export_payload(slot),
            model=self._model_name,
        )

    def export_payload(self, slot: Slot) -> memoryview:
        """The slot's KV as a state's payload: a read-only view of a buffer of its own."""
        # llama.cpp writes straight into a bytearray that the state then views: this runs
        # on the scheduler thread, between decode steps, so every copy of tens of MB stalls
        # every running sequence
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        raw = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(raw)
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot.seq_id)
        del buf  # releases its export of ``raw``
        payload = memoryview(raw)[:written].toreadonly()
        if self.portable:
            payload = portable_payload(payload, self._n_stream, slot.seq_id)
        return payload

    def restore(self, slot: Slot, state: KVState) -> None:
        """Replace the slot's KV and tokens with the state's (checked compatible before)."""
        if len(state.tokens) >= self.context_per_slot:
            raise ContextLengthExceeded(
                f"the state holds {len(state.tokens)} tokens; this engine's context is "
                f"{self.context_per_slot}"
            )
        self._set(slot, self._framed(state, slot.seq_id), state.tokens)

    def _framed(self, state: KVState, seq_id: int) -> bytearray | memoryview:
        """The state as llama.cpp reads it, in a writable buffer (ctypes borrows only
        those). llama.cpp restores into the sequence it is asked to, whatever seq id the
        framing names: one framed buffer serves any slot."""
        if self.portable:
            return native_payload(state, self._n_stream, seq_id)
        return state.with_prefix(b"")

    def _set(self, slot: Slot, payload: bytearray | memoryview, tokens: list[int]) -> None:
        self.trim(slot.seq_id, 0)
        slot.tokens = []
        buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
        ok = llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(payload), slot.seq_id)
        del buf
        if ok == 0:
            self.trim(slot.seq_id, 0)
            raise StateError("llama.cpp refused the KV state (corrupt, or no room in the cache)")
        slot.tokens = list(tokens)
        slot.last_used = time.monotonic()

    def copy(self, src: Slot, dst: Slot, n_tokens: int) -> None:
        """Make ``dst`` hold the first ``n_tokens`` of ``src``'s KV (nothing when the
        cache cannot trim a sequence's tail, as with sliding-window attention)."""
        self.copy_to_many(src, [dst], n_tokens)

    def copy_to_many(self, src: Slot, dsts: list[Slot], n_tokens: int) -> None:
        """``copy`` into each of ``dsts`` (a fork's branches): one export for them all."""
        state = self.export(src, next_token=None)
        framed = self._framed(state, src.seq_id)
        for dst in dsts:
            self._set(dst, framed, state.tokens)
            if n_tokens < len(dst.tokens):
                if self.trim(dst.seq_id, n_tokens):
                    del dst.tokens[n_tokens:]
                else:  # cannot trim (SWA): the copy is useless
                    self.trim(dst.seq_id, 0)
                    dst.tokens = []

    def trim(self, seq_id: int, start: int) -> bool:
        """Drop the sequence's KV from position ``start`` on; False when the cache cannot
        (a partial removal from a sliding-window or recurrent cache). The caller keeps
        ``Slot.tokens`` in step."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, start, -1))


# -- the KV cache's size ----------------------------------------------------------------


def kv_shape(model: LlamaModel, name: str = "") -> ModelShape:
    """The planner's ``ModelShape`` of a loaded model, for sizing its KV cache.

    Dimensions from llama.cpp; the key and value head sizes from the GGUF metadata
    (``<arch>.attention.key_length`` / ``value_length``), else ``n_embd / n_head``, as
    ``pcrt.runtime.models.planning.model_shape`` reads them from the file (Gemma 3's heads
    are 256 wide whatever n_embd / n_head is). Weight bytes are not known here and are 0:
    only the KV formula reads this shape.
    """
    arch = model.metadata("general.architecture") or "unknown"
    n_head = max(1, model.n_head)  # recurrent models have no attention heads: no KV
    derived = model.n_embd // n_head
    n_layers = max(1, model.n_layer)
    return ModelShape(
        name=name,
        architecture=arch,
        n_layers=n_layers,
        n_embd=max(1, model.n_embd),
        n_head=n_head,
        n_head_kv=model.n_head_kv,
        head_dim_k=_positive_int(model.metadata(f"{arch}.attention.key_length")) or derived,
        head_dim_v=_positive_int(model.metadata(f"{arch}.attention.value_length")) or derived,
        n_vocab=max(1, model.n_vocab),
        n_ctx_train=model.n_ctx_train or None,
        layer_bytes=(0,) * n_layers,
        token_embd_bytes=0,
    )


def kv_cache_bytes(
    shape: ModelShape, context: int, parallel: int, type_k: KVType, type_v: KVType
) -> int:
    """Bytes of the KV cache of ``parallel`` slots of ``context`` tokens each, every layer:
    what ``OffloadPlan.kv_bytes`` says for the same model, context and slots."""
    return kv_bytes_per_layer(shape, context, parallel, type_k, type_v) * shape.n_layers


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else 0
    except ValueError:  # an array or a float where a count was expected
        return None
    return value if value > 0 else None
