"""Exported KV state of one sequence: the blob format and its compatibility key.

llama.cpp checks little when a sequence state is loaded: another quantisation or
fine-tune of the same architecture loads silently and then produces garbage. So every
blob carries a key (GGUF sha256, K/V cache types, flash attention, llama-cpp-python
version, pcrt's format version) and an import refuses any mismatch.

Layout (all integers little-endian)::

    b"PCRTKV\\0\\1"  magic and format version
    u32             length of the JSON header
    header          {"key": {...}, "tokens": [...], "next_token": int | null,
                     "payload_sha256": hex, "payload_bytes": int, "model": name}
    payload         llama_state_seq_get_data() bytes

The sequence state holds no logits, so the blob keeps the next sampled (not yet decoded)
token: a resume decodes it first and continues exactly where the original run was.

llama.cpp writes a sequence's state as ``u32 magic, i32 seq_id, u32 n_stream`` followed
by one section per KV stream (``u32 cell_count`` then cells), all empty but the
sequence's own. ``n_stream`` is the number of slots when each slot has its own stream, so
a raw blob only loads into an engine with the same ``parallel``. For plain KV caches
pcrt stores just the one non-empty section (layout ``portable``) and rebuilds the header
for the engine that imports it; for caches with several parts (sliding-window,
recurrent) it keeps llama.cpp's bytes and puts the stream count into the key (layout
``raw-N``), so a mismatch is refused clearly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from pydantic import BaseModel, ConfigDict

from pcrt.cache.blobs import BlobInfo
from pcrt.runtime.errors import IncompatibleState, StateError

__all__ = [
    "PORTABLE_LAYOUT",
    "RAW_LAYOUT_PREFIX",
    "STATE_FORMAT_VERSION",
    "ChunkedState",
    "CompatKey",
    "KVState",
    "StateHeader",
    "describe_state",
    "is_chunked_blob",
    "verify_blob",
    "native_payload",
    "portable_payload",
    "raw_layout",
]

STATE_FORMAT_VERSION = 1
_MAGIC = b"PCRTKV\x00\x01"
_CHUNKED_MAGIC = b"PCRTKC\x00\x01"  # same header and framing; the payload is a tail
_CHUNK_KEY = re.compile(r"^[0-9a-f]{64}$")
_HEADER_LIMIT = 64 * 1024 * 1024  # a header is token ids: even 1M tokens fit
PORTABLE_LAYOUT = "portable"
RAW_LAYOUT_PREFIX = "raw-"
_U32 = struct.Struct("<I")
_LLAMA_SEQ_MAGIC = 0xAF143CD8  # llama-context.cpp: io_magic of sequence states


def raw_layout(n_stream: int) -> str:
    """The layout of a state kept in llama.cpp's own bytes: ``raw-N``, N its KV streams."""
    return f"{RAW_LAYOUT_PREFIX}{n_stream}"


class CompatKey(BaseModel):
    """Everything that must match for a saved KV state to mean the same thing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_sha256: str
    type_k: str
    type_v: str
    flash_attn: bool
    layout: str = PORTABLE_LAYOUT
    llama_cpp_version: str = llama_cpp.__version__
    format_version: int = STATE_FORMAT_VERSION

    def refuse_unless_same(self, saved: CompatKey) -> None:
        """``IncompatibleState`` naming each field of a ``saved`` state's key that differs
        from this engine's."""
        problems = self.mismatches(saved)
        if problems:
            raise IncompatibleState(
                "this KV state was saved by an incompatible engine: " + "; ".join(problems)
            )

    def mismatches(self, other: CompatKey) -> list[str]:
        """Human lines naming each differing field (empty when compatible)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [
            f"{name}: state has {theirs[name]!r}, this engine has {mine[name]!r}"
            for name in mine
            if mine[name] != theirs[name]
        ]


@dataclass(frozen=True)
class StateHeader:
    """What a blob says about itself, read without loading or hashing its payload.

    Listing many states (or answering a download with its key) must not read gigabytes;
    the payload is verified only when a state is actually loaded (``KVState.from_bytes``).
    """

    key: CompatKey
    model: str
    n_tokens: int
    next_token: int | None
    payload_bytes: int
    payload_sha256: str
    # a chunked state's (``ChunkedState``): its chunks' keys and size; empty for a whole one
    chunks: tuple[str, ...] = ()
    chunk_tokens: int = 0
    tail_tokens: int = 0

    @property
    def chunked(self) -> bool:
        return bool(self.chunk_tokens)


@dataclass(frozen=True)
class KVState:
    """A sequence's KV cache plus what is needed to continue it."""

    key: CompatKey
    tokens: list[int]  # tokens whose KV is in the payload, in order
    next_token: int | None  # sampled after tokens[-1], not decoded yet
    # bytes, or a read-only view into a larger buffer (a blob as read, an export): tens
    # of MB that are never copied just to be sliced
    payload: bytes | memoryview = field(repr=False)
    model: str = ""
    # the private, writable buffer the payload is the tail of, when parsed from one (a
    # mapped blob): its header bytes are spent, so llama.cpp's framing can go there
    source: memoryview | None = field(default=None, repr=False, compare=False)

    @property
    def continuation(self) -> list[int]:
        """The prompt that continues this state: its tokens plus the pending one."""
        return self.tokens + ([self.next_token] if self.next_token is not None else [])

    def with_prefix(self, prefix: bytes) -> bytearray | memoryview:
        """``prefix + payload`` as one writable buffer, for llama.cpp to read in place.

        Written into ``source`` when it has room before the payload (no copy); else built
        with one copy.
        """
        n = len(self.payload)
        room = self.source
        if room is not None and len(room) - n >= len(prefix):
            framed = room[len(room) - n - len(prefix) :]
            framed[: len(prefix)] = prefix
            return framed
        built = bytearray(len(prefix) + n)
        built[: len(prefix)] = prefix
        built[len(prefix) :] = self.payload
        return built

    def to_bytes(self) -> bytes:
        return _blob(
            _MAGIC,
            {
                "key": self.key.model_dump(),
                "tokens": self.tokens,
                "next_token": self.next_token,
                "payload_sha256": hashlib.sha256(self.payload).hexdigest(),
                "payload_bytes": len(self.payload),
                "model": self.model,
            },
            self.payload,
        )

    @classmethod
    def from_bytes(
        cls, blob: bytes | memoryview, *, verify: bool = True, in_place: bool = False
    ) -> KVState:
        """Parse a blob. ``verify=False`` skips hashing the payload, for bytes whose
        integrity was just checked another way (a content-addressed blob whose name is
        the sha256 of all of it): 46 MB hashed twice costs ~0.1 s of a resume.
        ``in_place=True`` lets an import overwrite the (writable, private) blob's header
        bytes with llama.cpp's framing instead of copying the payload."""
        header, tokens, payload = _parse_blob(blob, verify)
        if header.chunked:
            raise StateError(
                "this KV state is kept as chunks: it loads through an engine's chunk store"
            )
        view = memoryview(blob)
        source = view if in_place and not view.readonly else None
        return cls(header.key, tokens, header.next_token, payload, header.model, source)

    @staticmethod
    def read_header(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> StateHeader:
        """The header of a blob (its bytes, or a file read only as far as the header).

        Checks the magic, the header and the total length; does not hash the payload.
        """
        if isinstance(source, bytes | bytearray | memoryview):
            view = memoryview(source)
            prefix = bytes(view[:_PREFIX_LEN])
            header_len = _header_length(prefix)
            raw = bytes(view[_PREFIX_LEN : _PREFIX_LEN + header_len])
            total = len(view)
        else:
            with open(source, "rb") as f:
                prefix = f.read(_PREFIX_LEN)
                header_len = _header_length(prefix)
                raw = f.read(header_len)
                total = os.fstat(f.fileno()).st_size
        if len(raw) < header_len:
            raise StateError("truncated or corrupt KV state header")
        header, _ = _decode_header(raw, is_chunked_blob(prefix))
        if total != _PREFIX_LEN + header_len + header.payload_bytes:
            raise StateError(
                f"truncated KV state: {total} bytes, header says "
                f"{_PREFIX_LEN + header_len + header.payload_bytes}"
            )
        return header

    def check_compatible(self, engine_key: CompatKey) -> None:
        engine_key.refuse_unless_same(self.key)


@dataclass(frozen=True)
class ChunkedState:
    """A KV state kept as the keys of its full chunks in the KV chunk store plus a tail of
    fewer than C tokens (issue 19): a blob of kilobytes where a whole state is tens of MB,
    whose chunks a fork's branches, a conversation's turns and a run's checkpoints share.

    The blob is a whole state's (magic ``PCRTKC``, a JSON header, a payload) with the
    chunks' keys and size in the header and the tail's KV section as the payload. A
    checkpoint keeps no tail (``tail_tokens`` 0): a resume computes those few tokens, and
    the checkpoints of one generation write each chunk once. ``tokens`` are all the
    tokens the original state held, whatever the chunks and tail cover.
    """

    key: CompatKey
    tokens: list[int]
    next_token: int | None
    chunk_tokens: int
    chunks: tuple[str, ...]
    tail: bytes | memoryview = field(repr=False)
    tail_tokens: int = 0
    model: str = ""

    @property
    def covered(self) -> int:
        """Tokens whose KV the chunks and the tail hold (all of them, or all but a
        checkpoint's tail)."""
        return len(self.chunks) * self.chunk_tokens + self.tail_tokens

    def to_bytes(self) -> bytes:
        return _blob(
            _CHUNKED_MAGIC,
            {
                "key": self.key.model_dump(),
                "tokens": self.tokens,
                "next_token": self.next_token,
                "payload_sha256": hashlib.sha256(self.tail).hexdigest(),
                "payload_bytes": len(self.tail),
                "model": self.model,
                "chunk_tokens": self.chunk_tokens,
                "chunks": list(self.chunks),
                "tail_tokens": self.tail_tokens,
            },
            self.tail,
        )

    @classmethod
    def from_bytes(cls, blob: bytes | memoryview) -> ChunkedState:
        header, tokens, tail = _parse_blob(blob, verify=True)
        if not header.chunked:
            raise StateError("not a chunked KV state")
        return cls(
            header.key,
            tokens,
            header.next_token,
            header.chunk_tokens,
            header.chunks,
            tail,
            header.tail_tokens,
            header.model,
        )

    def check_compatible(self, engine_key: CompatKey) -> None:
        engine_key.refuse_unless_same(self.key)


def verify_blob(blob: bytes | memoryview) -> StateHeader:
    """A stored state of either kind, whole or chunked, checked through (header, length,
    payload hash): what a peer's upload must pass before it is kept."""
    header, _, _ = _parse_blob(blob, verify=True)
    return header


def is_chunked_blob(prefix: bytes | memoryview) -> bool:
    """Whether a blob (its first bytes) is a ``ChunkedState``."""
    return bytes(prefix[: len(_CHUNKED_MAGIC)]) == _CHUNKED_MAGIC


def _blob(magic: bytes, header: dict[str, Any], payload: bytes | memoryview) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([magic, struct.pack("<I", len(raw)), raw, payload])


def _parse_blob(
    blob: bytes | memoryview, verify: bool
) -> tuple[StateHeader, list[int], memoryview]:
    """A blob's header, tokens and payload (a read-only view), its length checked and,
    with ``verify``, its payload's hash."""
    view = memoryview(blob)
    header_len = _header_length(bytes(view[:_PREFIX_LEN]))
    if len(view) < _PREFIX_LEN + header_len:
        raise StateError("truncated or corrupt KV state header")
    offset = _PREFIX_LEN + header_len
    header, tokens = _decode_header(bytes(view[_PREFIX_LEN:offset]), is_chunked_blob(view))
    payload = view[offset:].toreadonly()
    if len(payload) != header.payload_bytes:
        raise StateError(
            f"truncated KV state: payload has {len(payload)} bytes, "
            f"header says {header.payload_bytes}"
        )
    if verify and hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise StateError("corrupt KV state: payload sha256 does not match its header")
    return header, tokens, payload


_PREFIX_LEN = len(_MAGIC) + _U32.size


def _header_length(prefix: bytes) -> int:
    """The JSON header's length from the blob's first ``_PREFIX_LEN`` bytes."""
    if prefix[: len(_MAGIC)] not in (_MAGIC, _CHUNKED_MAGIC):
        raise StateError("not a pcrt KV state (bad magic or unknown format version)")
    if len(prefix) < _PREFIX_LEN:
        raise StateError("truncated KV state: no header")
    (header_len,) = _U32.unpack_from(prefix, len(_MAGIC))
    if header_len > _HEADER_LIMIT:
        raise StateError("truncated or corrupt KV state header")
    return int(header_len)


def _decode_header(raw: bytes, chunked: bool = False) -> tuple[StateHeader, list[int]]:
    """The header, every field checked for its type and range: a blob comes from a user
    or a peer, and its header is read before anything else about it is trusted."""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        # an escaped lone surrogate ("\\ud800") decodes to a str that is no UTF-8 text:
        # it could never be answered, listed or logged
        json.dumps(header, ensure_ascii=False).encode("utf-8")
        tokens = [_token_id(t) for t in header["tokens"]]
        next_token = header["next_token"]
        model = header.get("model", "")
        sha = header["payload_sha256"]
        if not isinstance(model, str) or not isinstance(sha, str):
            raise ValueError("model and payload_sha256 must be strings")
        parsed = StateHeader(
            key=CompatKey.model_validate(header["key"]),
            model=model,
            n_tokens=len(tokens),
            next_token=None if next_token is None else _token_id(next_token),
            payload_bytes=_count(header["payload_bytes"]),
            payload_sha256=sha,
            **(_chunk_fields(header, len(tokens)) if chunked else {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise StateError(f"corrupt KV state header: {type(exc).__name__}: {exc}") from None
    return parsed, tokens


def _chunk_fields(header: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """A chunked state's own header fields, each checked: they name files on disk."""
    size = _count(header["chunk_tokens"])
    chunks = header["chunks"]
    if not isinstance(chunks, list) or not all(
        isinstance(k, str) and _CHUNK_KEY.match(k) for k in chunks
    ):
        raise ValueError("chunks must be a list of hex sha256 keys")
    tail = _count(header["tail_tokens"])
    if not size or len(chunks) * size + tail > n_tokens or tail >= size:
        raise ValueError("chunks and tail do not fit the state's tokens")
    return {"chunks": tuple(chunks), "chunk_tokens": size, "tail_tokens": tail}


def _token_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise ValueError(f"not a token id: {str(value)[:40]}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a byte count: {str(value)[:40]}")
    return value


def portable_payload(raw: memoryview, n_stream: int, seq_id: int) -> memoryview:
    """Strip llama.cpp's framing from one sequence's state (see the module doc): a view of
    ``raw``, not a copy.

    With one stream per slot, the sequence's stream index is its seq id.
    """
    head = _llama_head(seq_id, n_stream) + _U32.pack(0) * seq_id
    tail = _U32.size * (n_stream - seq_id - 1)
    if raw[: len(head)] != head or (tail and raw[len(raw) - tail :] != b"\0" * tail):
        raise StateError("unexpected llama.cpp sequence-state framing; cannot export portably")
    return raw[len(head) : len(raw) - tail]


def native_payload(state: KVState, n_stream: int, seq_id: int) -> bytearray | memoryview:
    """A portable state framed for sequence ``seq_id`` of an engine with ``n_stream`` streams.

    llama.cpp restores a non-empty section into the destination sequence's own stream
    whatever its position among the sections, so the empty ones go first: then all of
    the framing precedes the payload, and fits in place of a mapped blob's header.
    """
    return state.with_prefix(_llama_head(seq_id, n_stream) + _U32.pack(0) * (n_stream - 1))


def _llama_head(seq_id: int, n_stream: int) -> bytes:
    return struct.pack("<IiI", _LLAMA_SEQ_MAGIC, seq_id, n_stream)


def describe_state(
    info: BlobInfo, header: StateHeader | None, problem: str | None = None
) -> dict[str, Any]:
    """One stored state as the API and ``pcrt state list --json`` show it."""
    return {
        "id": info.sha256,
        "object": "state",
        "size": info.size,
        "kind": info.kind,
        "run_id": info.run_id,
        "created_at": info.created_at,
        "last_used_at": info.last_used_at,
        "model": header.model if header else None,
        "tokens": header.n_tokens if header else None,
        "key": header.key.model_dump() if header else None,
        # a chunked state's full chunks (its tokens' KV lives in the chunk store)
        "chunks": len(header.chunks) if header else None,
        "error": problem,  # set when the header cannot be read: the blob is unusable
    }
