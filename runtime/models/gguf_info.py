"""GGUF metadata, read with the ``gguf`` package without loading the model.

``pcrt models show`` prints it; the device planner (issue 4) sizes layers from the tensor
byte counts grouped here (per ``blk.N``, the output head, the token embeddings). The reader
memory-maps the file and only header bytes are touched: tensor data is never read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict

from pcrt.runtime.errors import ModelLoadError

__all__ = ["GgufInfo", "TensorBytes", "read_gguf_info"]

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class TensorBytes(BaseModel):
    """Bytes of tensor data, grouped the way layers are offloaded."""

    model_config = ConfigDict(frozen=True)

    per_block: tuple[int, ...]
    """Bytes of ``blk.N.*`` for N = 0, 1, ... (index = block number)."""
    output: int
    """``output.weight`` (0 when the output head is tied to the token embeddings)."""
    token_embd: int
    other: int
    """Everything else (final norm, rope factors, ...)."""
    total: int


class GgufInfo(BaseModel):
    """What a GGUF file says about its model. None: the file does not say."""

    model_config = ConfigDict(frozen=True)

    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    feed_forward_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    """Per-head K dimension (from metadata, else embedding_length / head_count)."""
    value_length: int | None
    file_type: str | None
    """Quantisation of the file as a whole, e.g. ``MOSTLY_Q4_1``."""
    tensor_types: dict[str, int]
    """How many tensors of each type, e.g. ``{"Q4_1": 210, "F32": 61}``."""
    tensor_count: int
    parameter_count: int
    vocab_size: int | None
    has_chat_template: bool
    chat_template: str | None
    tied_embeddings: bool
    tensor_bytes: TensorBytes


def read_gguf_info(path: Path | str) -> GgufInfo:
    """Read a GGUF file's metadata; a file that is not GGUF raises ``ModelLoadError``."""
    path = Path(path)
    try:
        reader = _open(path)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None or not field.types:
            return None
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            return None  # arrays are counted, not materialised (vocabularies are large)
        return field.contents()

    def int_value(key: str) -> int | None:
        raw = value(key)
        return int(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None

    arch = str(value("general.architecture") or "unknown")
    heads = int_value(f"{arch}.attention.head_count")
    embedding = int_value(f"{arch}.embedding_length")
    derived_head_dim = embedding // heads if embedding and heads else None

    file_type_id = int_value("general.file_type")
    file_type: str | None = None
    if file_type_id is not None:
        try:
            file_type = gguf.LlamaFileType(file_type_id).name
        except ValueError:
            file_type = f"unknown ({file_type_id})"

    vocab = int_value(f"{arch}.vocab_size")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if vocab is None and tokens is not None:
        vocab = _array_length(tokens)

    template = value("tokenizer.chat_template")
    version = reader.fields.get("GGUF.version")

    types: Counter[str] = Counter()
    per_block: dict[int, int] = {}
    output = token_embd = other = params = 0
    names = set()
    for tensor in reader.tensors:
        names.add(tensor.name)
        types[tensor.tensor_type.name] += 1
        params += int(tensor.n_elements)
        size = int(tensor.n_bytes)
        m = _BLOCK.match(tensor.name)
        if m:
            per_block[int(m[1])] = per_block.get(int(m[1]), 0) + size
        elif tensor.name == "output.weight":
            output += size
        elif tensor.name == "token_embd.weight":
            token_embd += size
        else:
            other += size
    blocks = tuple(per_block.get(i, 0) for i in range(max(per_block, default=-1) + 1))

    return GgufInfo(
        path=str(path),
        file_size=path.stat().st_size,
        gguf_version=int(version.contents()) if version is not None else 0,
        architecture=arch,
        name=value("general.name"),
        block_count=int_value(f"{arch}.block_count"),
        context_length=int_value(f"{arch}.context_length"),
        embedding_length=embedding,
        feed_forward_length=int_value(f"{arch}.feed_forward_length"),
        head_count=heads,
        head_count_kv=int_value(f"{arch}.attention.head_count_kv"),
        key_length=int_value(f"{arch}.attention.key_length") or derived_head_dim,
        value_length=int_value(f"{arch}.attention.value_length") or derived_head_dim,
        file_type=file_type,
        tensor_types=dict(sorted(types.items())),
        tensor_count=len(reader.tensors),
        parameter_count=params,
        vocab_size=vocab,
        has_chat_template=bool(template),
        chat_template=template or None,
        tied_embeddings="output.weight" not in names,
        tensor_bytes=TensorBytes(
            per_block=blocks,
            output=output,
            token_embd=token_embd,
            other=other,
            total=sum(blocks) + output + token_embd + other,
        ),
    )


def read_gguf_metadata(path: Path | str) -> dict[str, Any]:
    """Every key-value field of a GGUF but its chat template, arrays as None (a
    vocabulary is large): what Ollama's ``/api/show`` calls ``model_info``. A value that
    does not decode (bad UTF-8 in a field nobody reads) is None rather than an error."""
    path = Path(path)
    try:
        reader = _open(path)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None
    found: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.chat_template":
            continue
        value = None
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            with contextlib.suppress(UnicodeDecodeError, ValueError, IndexError):
                value = field.contents()
        found[key] = value
    return found


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return _HeaderReader(path, "r")
    except (AttributeError, TypeError) as exc:  # the gguf package changed its internals
        log.warning("fast GGUF header reader failed (%s): using the stock reader", exc)
        return gguf.GGUFReader(path, "r")


class _HeaderReader(gguf.GGUFReader):
    """``GGUFReader`` that skips over string arrays instead of materialising them.

    The stock reader makes a numpy view per element of every array: for a 49k-token
    vocabulary plus its merges that is seconds of work for values ``show`` never prints.
    Here a string array keeps only its type and length (``contents()`` gives ``[]``) and a
    numeric array becomes one view; every other field parses as before.
    """

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[Any], list[int], list[gguf.GGUFValueType]]:
        if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs
        raw_itype = self._get(offs, np.uint32)
        offs += int(raw_itype.nbytes)
        alen = self._get(offs, np.uint64)
        offs += int(alen.nbytes)
        itype = gguf.GGUFValueType(raw_itype[0])
        count = int(alen[0])
        types = [gguf.GGUFValueType.ARRAY, itype]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, count)
            return offs + int(values.nbytes) - orig_offs, [raw_itype, alen, values], [2], types
        if itype == gguf.GGUFValueType.STRING:
            native = sys.byteorder == "little"
            fmt = "<Q" if native == (self.byte_order == "I") else ">Q"
            buf = memoryview(self.data.data)
            for _ in range(count):
                (length,) = struct.unpack_from(fmt, buf, offs)
                offs += 8 + length
            return offs - orig_offs, [raw_itype, alen], [], types
        return super()._get_field_parts(orig_offs, raw_type)


def _array_length(field: Any) -> int:
    """Element count of an array field: the ``alen`` part after key, key type and item type."""
    return int(field.parts[4][0])
