"""A sequence's KV state cut into runs of cells and joined back, byte for byte (issue 19's
first step: the chunk store builds on it). Pure: bytes in, bytes out.

The state is pcrt's ``portable`` payload (``state.portable_payload``): llama.cpp's one
non-empty KV section, laid out as ``llama_kv_cache::state_write`` writes it in the
vendored llama.cpp (``src/llama-kv-cache.cpp``, ``state_write_meta`` and
``state_write_data``)::

    u32 cell_count
    cell_count x (i32 pos, u32 n_seq_id = 1, i32 seq_id)         12 bytes a cell
    u32 v_trans, u32 n_layer
    n_layer x (i32 k_type, u64 k_row, cell_count x k_row bytes)   K, a row per cell
    v_trans = 0: n_layer x (i32 v_type, u64 v_row, cell_count x v_row bytes)
    v_trans = 1: n_layer x (i32 v_type, u32 v_el, u32 n_embd_v,   V transposed (flash
                 n_embd_v x cell_count x v_el bytes)               attention off)

The layout carries no version, so ``parse`` checks that it reads every byte and nothing
more, that each cell holds one sequence, and that positions run 0, 1, 2, ... in cell
order (a chunk's from its first position on): anything else (a cell extension of M-RoPE
models, cells out of order, another llama.cpp) is a ``KvLayoutError``, and the caller
keeps the state whole. ``join`` puts consecutive chunks back into one section. K is stored after
RoPE, so a run of cells is only valid at its own positions: a chunk is always a prefix's
continuation, never moved.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["KvLayoutError", "KvSection", "join", "parse"]

_U32 = struct.Struct("<I")
_CELL = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])


class KvLayoutError(ValueError):
    """The bytes are not a KV section this module understands (keep the state whole)."""


@dataclass(frozen=True)
class _Layer:
    kind: int  # ggml type
    row: int  # bytes a cell takes in this layer (a K or V row; a V element when transposed)
    data: np.ndarray  # uint8: (cells, row), or (n_embd_v, cells * el) when transposed


@dataclass(frozen=True)
class KvSection:
    """One sequence's KV section, parsed: its cells and each layer's K and V."""

    cells: np.ndarray  # _CELL records, in position order
    v_trans: bool
    k: tuple[_Layer, ...]
    v: tuple[_Layer, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.cells)

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes a cell takes over all layers (its meta not counted)."""
        v_cell = [x.row * (x.data.shape[0] if self.v_trans else 1) for x in self.v]
        return sum(x.row for x in self.k) + sum(v_cell)

    @property
    def layers(self) -> tuple[tuple[int, int], ...]:
        """Each K then V layer's type and row (element) size: what chunks to be joined,
        and an engine to restore them, must agree on."""
        return tuple((x.kind, x.row) for x in self.k + self.v)

    def head(self, n: int) -> KvSection:
        """Its first ``n`` cells, as views (no copy)."""
        if not 0 < n <= self.n_tokens:
            raise ValueError(f"the first {n} cells of {self.n_tokens}")
        k = tuple(_Layer(x.kind, x.row, x.data[:n]) for x in self.k)
        if self.v_trans:
            v = tuple(_Layer(x.kind, x.row, x.data[:, : n * x.row]) for x in self.v)
        else:
            v = tuple(_Layer(x.kind, x.row, x.data[:n]) for x in self.v)
        return KvSection(self.cells[:n], self.v_trans, k, v)

    def cut(self, start: int, end: int, seq_id: int | None = None) -> bytes:
        """The section of cells ``start:end``: a valid state of those tokens only when
        ``start`` is 0 (a prefix); the bytes a chunk store keeps otherwise. ``seq_id``:
        the sequence the cells name (llama.cpp ignores it on restore, but writes the
        exporting slot's: a store normalises it so equal chunks are equal bytes)."""
        if not 0 <= start <= end <= self.n_tokens:
            raise ValueError(f"cells {start}:{end} of {self.n_tokens}")
        cells = self.cells[start:end]
        if seq_id is not None:
            cells = cells.copy()
            cells["seq"] = seq_id
        parts = [_U32.pack(end - start), cells.tobytes()]
        parts.append(struct.pack("<II", int(self.v_trans), len(self.k)))
        for layer in self.k:
            parts.append(struct.pack("<iQ", layer.kind, layer.row))
            parts.append(layer.data[start:end].tobytes())
        for layer in self.v:
            if self.v_trans:
                n_embd = layer.data.shape[0]
                parts.append(struct.pack("<iII", layer.kind, layer.row, n_embd))
                cols = layer.data[:, start * layer.row : end * layer.row]
                parts.append(np.ascontiguousarray(cols).tobytes())
            else:
                parts.append(struct.pack("<iQ", layer.kind, layer.row))
                parts.append(layer.data[start:end].tobytes())
        return b"".join(parts)


def parse(payload: bytes | memoryview) -> KvSection:
    """A portable KV payload as a ``KvSection``; ``KvLayoutError`` when it is not one."""
    view = memoryview(payload).cast("B")
    reader = _Reader(view)
    try:
        n = reader.u32()
        cells = np.frombuffer(reader.take(n * _CELL.itemsize), dtype=_CELL)
        first = int(cells["pos"][0]) if n else 0
        if n and (
            np.any(cells["n_seq"] != 1)
            or not np.array_equal(cells["pos"], np.arange(first, first + n))
        ):
            raise KvLayoutError("cells out of order, or not one sequence each")
        v_trans, n_layer = reader.u32(), reader.u32()
        if v_trans not in (0, 1) or not 0 < n_layer <= 4096:
            raise KvLayoutError(f"unexpected v_trans {v_trans} or {n_layer} layers")
        k = tuple(_rows(reader, n) for _ in range(n_layer))
        if v_trans:
            v = tuple(_transposed(reader, n) for _ in range(n_layer))
        else:
            v = tuple(_rows(reader, n) for _ in range(n_layer))
    except struct.error:
        raise KvLayoutError("the section ends early") from None
    if reader.left:
        raise KvLayoutError(f"{reader.left} bytes after the section (cell extensions?)")
    return KvSection(cells.copy(), bool(v_trans), k, v)


def join(parts: Sequence[KvSection], *, room: int = 0, into: bytearray | None = None) -> memoryview:
    """Consecutive sections (each starting where the one before ends, the same layers)
    as one section's bytes: the state of all their tokens, written once into a buffer
    that leaves ``room`` bytes before it free (for llama.cpp's framing: a restore of tens
    of MB must not copy them again to put a header in front). ``into``: the buffer, when
    it is big enough (a new one of tens of MB costs more to fault in than to fill); a
    writable view of its first ``room`` + section bytes comes back."""
    if not parts:
        raise ValueError("nothing to join")
    first = parts[0]
    shape = first.layers
    for before, after in zip(parts, parts[1:], strict=False):
        end = int(before.cells["pos"][-1]) + 1 if before.n_tokens else None
        if end is not None and after.n_tokens and int(after.cells["pos"][0]) != end:
            raise KvLayoutError("the chunks do not follow each other")
        if after.layers != shape or after.v_trans != first.v_trans:
            raise KvLayoutError("the chunks' layers differ")
    n = sum(p.n_tokens for p in parts)
    size = _U32.size + n * _CELL.itemsize + 8 + 12 * (len(first.k) + len(first.v))
    size += n * first.bytes_per_token
    if into is not None and len(into) >= room + size:
        out = into
    else:  # a quarter to spare: the next restore is likely a little longer
        out = bytearray((room + size) * (5 if into is not None else 4) // 4)
    buf = np.frombuffer(out, dtype=np.uint8, count=room + size)
    at = room
    _U32.pack_into(out, at, n)
    at += _U32.size
    for p in parts:
        raw = p.cells.view(np.uint8)
        buf[at : at + raw.size] = raw
        at += raw.size
    struct.pack_into("<II", out, at, int(first.v_trans), len(first.k))
    at += 8
    # one concatenate per layer into its place: a copy per chunk cost half again more
    for i, layer in enumerate(first.k):
        struct.pack_into("<iQ", out, at, layer.kind, layer.row)
        at = _concatenated(buf, at + 12, [p.k[i].data for p in parts], axis=0)
    for i, layer in enumerate(first.v):
        if first.v_trans:  # each channel's run of cells: a strided gather
            n_embd = layer.data.shape[0]
            struct.pack_into("<iII", out, at, layer.kind, layer.row, n_embd)
            at = _concatenated(buf, at + 12, [p.v[i].data for p in parts], axis=1)
        else:
            struct.pack_into("<iQ", out, at, layer.kind, layer.row)
            at = _concatenated(buf, at + 12, [p.v[i].data for p in parts], axis=0)
    return memoryview(out)[: room + size]


def _concatenated(buf: np.ndarray, at: int, blocks: list[np.ndarray], axis: int) -> int:
    """``blocks`` joined along ``axis`` into ``buf`` from ``at``; where they end."""
    rows, cols = blocks[0].shape
    shape = (
        (sum(b.shape[0] for b in blocks), cols)
        if axis == 0
        else (rows, sum(b.shape[1] for b in blocks))
    )
    size = shape[0] * shape[1]
    np.concatenate(blocks, axis=axis, out=buf[at : at + size].reshape(shape))
    return at + size


def _rows(reader: _Reader, n: int) -> _Layer:
    kind, row = struct.unpack("<iQ", reader.take(12))
    if not 0 < row <= 1 << 24:
        raise KvLayoutError(f"a row of {row} bytes")
    data = np.frombuffer(reader.take(n * row), dtype=np.uint8).reshape(n, row)
    return _Layer(kind, row, data)


def _transposed(reader: _Reader, n: int) -> _Layer:
    kind, el, n_embd = struct.unpack("<iII", reader.take(12))
    if not 0 < el <= 8 or not 0 < n_embd <= 1 << 20:
        raise KvLayoutError(f"a transposed V of {n_embd} x {el} bytes")
    data = np.frombuffer(reader.take(n_embd * n * el), dtype=np.uint8).reshape(n_embd, n * el)
    return _Layer(kind, el, data)


class _Reader:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.view) - self.at

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.view):
            raise struct.error("short")
        piece = self.view[self.at : self.at + n]
        self.at += n
        return piece
