"""The engine's side of the KV chunk store (``pcrt.cache.chunks``): which chunks a prompt
is made of, which of them the store holds, a chain of them as one KV state, and a slot's
new chunks spilled into the store.

A chunk is C consecutive tokens of a sequence (positions kC..kC+C-1: K is stored after
RoPE, so a chunk is only valid where it was computed). Its key chains every chunk before
it, rooted in everything that makes KV mean the same thing::

    root  = sha256("pcrt-kv-chunk/1" | the engine's CompatKey as JSON | C)
    key_k = sha256(key_{k-1} | chunk k's token ids as little-endian int32)

so equal prefixes of equal models give equal keys on any machine, and a chain from
another model, KV type or llama.cpp never matches. A sequence's end after its last full
chunk (a tail) is kept too, under ``tail_key``; the store indexes chunks and tails by
the chain they follow, so a prompt restores its whole common prefix with what the store
holds: the chain, then the start of the chunk or tail that shares the most of what
follows (llama-server restores whole prefixes from its RAM cache; vLLM and LMCache only
full blocks).

Before an engine uses the store it runs ``self_test`` on a free slot: decode 2C+5 tokens,
export, cut into chunks, join them back, compare bytes; restore the joined state, export
again, compare again. llama.cpp's state carries no version, so this is what says the
splitter understands this build and this model's cache; a model that fails (a
sliding-window or recurrent cache, another layout) keeps whole states, and the engine
says why (``Engine.chunk_status``).

Admission and spills run on the engine's scheduler thread (the cutting of a spill in the
store's writer thread); ``chunked`` and ``whole`` (DAG states, which block on the disk)
and ``whole_state`` in worker threads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from pcrt.cache.chunks import Chunk, ChunkStore
from pcrt.runtime.engine.kv import SlotKV
from pcrt.runtime.engine.kv_chunks import KvLayoutError, KvSection, join, parse
from pcrt.runtime.engine.prefix import common_prefix, copy_worth
from pcrt.runtime.engine.slots import Slot
from pcrt.runtime.engine.state import ChunkedState, CompatKey, KVState
from pcrt.runtime.errors import PcrtError, StateError

__all__ = ["ChunkCache", "Hit", "chain_keys", "chain_root", "self_test", "tail_key", "whole_state"]

_KEY_VERSION = b"pcrt-kv-chunk/1"


def chain_root(key: CompatKey, chunk_tokens: int) -> bytes:
    """The root every chain of this engine's chunks hangs from."""
    fields = json.dumps(key.model_dump(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(_KEY_VERSION + fields.encode() + b"|%d" % chunk_tokens).digest()


def chain_keys(root: bytes, tokens: Sequence[int], chunk_tokens: int) -> list[str]:
    """The keys (hex) of the full chunks of ``tokens``, in order."""
    raw = np.asarray(tokens, dtype="<i4").tobytes()
    step = chunk_tokens * 4
    keys = []
    parent = root
    for at in range(0, len(tokens) // chunk_tokens * step, step):
        digest = hashlib.sha256(parent + raw[at : at + step])
        parent = digest.digest()
        keys.append(digest.hexdigest())
    return keys


COMPUTED_TOKENS = 2
"""A restore from the store stops this many tokens before the prompt's end. The last is
decoded for its logits anyway; and a batch of one token runs through another of
llama.cpp's CPU matmul paths than a prompt's prefill did, whose rounding can flip a
greedy near-tie: restoring all but the last token of four prompts seen before flipped
one's answer, all but two flipped none (SmolLM2, measured here)."""

MIN_TAIL_TOKENS = 8
"""A sequence's end after its last full chunk is kept (and restored) from this many
tokens on: shorter ones cost a store entry to save next to nothing."""


def tail_key(parent: str, tokens: Sequence[int]) -> str:
    """The key of a tail: the tokens after the chain that ``parent`` ends (or a root's
    hex: a sequence shorter than a chunk)."""
    raw = np.asarray(tokens, dtype="<i4").tobytes()
    return hashlib.sha256(bytes.fromhex(parent) + b"tail" + raw).hexdigest()


@dataclass(frozen=True)
class Hit:
    """What the store holds of a prompt beyond what its slot has: full chunks, then the
    first ``tail_tokens`` of a chunk or tail that follows them (``tail``: its key)."""

    keys: list[str]
    tail: str | None
    tail_tokens: int
    in_ram: bool

    @property
    def all_keys(self) -> list[str]:
        return [*self.keys, *([self.tail] if self.tail is not None else [])]


class ChunkCache:
    """One engine's use of the store: its root, its chunk size, its cache's layers."""

    def __init__(
        self,
        store: ChunkStore,
        *,
        compat_key: CompatKey,
        layers: tuple[tuple[int, int], ...],
        kv: SlotKV,
        model_name: str,
    ) -> None:
        self.store = store
        self.chunk_tokens = store.chunk_tokens
        self.root = chain_root(compat_key, self.chunk_tokens)
        self._compat_key = compat_key
        self._layers = layers
        self._kv = kv
        self._model_name = model_name
        self._scratch = bytearray()  # the scheduler thread's, for restores (``state_of``)

    def keys(self, tokens: Sequence[int]) -> list[str]:
        return chain_keys(self.root, tokens, self.chunk_tokens)

    # -- admission ----------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int], cached: int) -> Hit | None:
        """The store's longest chain of ``prompt``'s chunks and the start of the chunk or
        tail after it that shares the most of the prompt's next tokens, when restoring
        them saves more than it costs against the ``cached`` tokens a slot gave; None
        otherwise. The last ``COMPUTED_TOKENS`` of the prompt are always computed."""
        usable = prompt[: len(prompt) - COMPUTED_TOKENS]
        c = self.chunk_tokens
        keys = self.keys(usable)
        held = self.store.chain_length(keys)
        self.store.note_miss(max(0, len(keys) - max(held, cached // c)))
        parent = keys[held - 1] if held else self.root.hex()
        tail, tail_tokens = None, 0
        for key, tokens in self.store.continuations_of(parent):
            shared = common_prefix(tokens, usable[held * c :])
            if shared > tail_tokens and shared >= MIN_TAIL_TOKENS and self.store.holds(key):
                tail, tail_tokens = key, shared
        covered = held * c + tail_tokens
        # reading a chain costs about a copy of it: the copy rule of ``prefix`` applies
        if covered == 0 or not copy_worth(covered - cached, covered):
            return None
        chain = [*keys[:held], *([tail] if tail is not None else [])]
        return Hit(keys[:held], tail, tail_tokens, self.store.in_ram(chain))

    def state_of(self, prompt: Sequence[int], hit: Hit, chunks: Sequence[Chunk]) -> KVState | None:
        """The chunks (the first of ``prompt``'s chain, as read) as one KV state of their
        tokens, framed in place for this engine; None when no chunk can be used. A chunk
        that does not parse as this engine's layers ends the chain there; the tail counts
        only after the whole chain."""
        sections = self._sections(chunks[: len(hit.keys)])
        whole_chain = len(sections) == len(hit.keys)
        if whole_chain and hit.tail is not None and len(chunks) > len(hit.keys):
            tail = self._tail(chunks[len(hit.keys)], len(sections) * self.chunk_tokens)
            if tail is not None and tail.n_tokens >= hit.tail_tokens:
                sections.append(tail.head(hit.tail_tokens))
        if not sections:
            return None
        n = sum(s.n_tokens for s in sections)
        state = self._joined(sections, list(prompt[:n]), None, scratch=True)
        self.store.note_restore(len(sections), len(state.tokens), len(state.payload))
        return state

    def _sections(self, chunks: Sequence[Chunk]) -> list[KvSection]:
        """The chunks, parsed, from the first up to one that is not the next of the chain
        in this engine's layout."""
        sections: list[KvSection] = []
        c = self.chunk_tokens
        for data in chunks:
            try:
                section = parse(data)
            except KvLayoutError:
                break
            start = int(section.cells["pos"][0]) if section.n_tokens else -1
            fits = section.n_tokens == c and start == len(sections) * c
            if not fits or section.layers != self._layers:
                break
            sections.append(section)
        return sections

    def _tail(self, data: Chunk, start: int) -> KvSection | None:
        """A tail as read, parsed, when it is this engine's and starts at ``start``."""
        try:
            section = parse(data)
        except KvLayoutError:
            return None
        if not section.n_tokens or section.layers != self._layers:
            return None
        return section if int(section.cells["pos"][0]) == start else None

    def _joined(
        self,
        sections: list[KvSection],
        tokens: list[int],
        next_token: int | None,
        *,
        scratch: bool = False,
    ) -> KVState:
        """``scratch``: joined into the scheduler thread's buffer, reused from one
        restore to the next (the state lives only until it is restored)."""
        room = self._kv.framing_bytes
        if not scratch:
            view = join(sections, room=room)
        else:
            view = join(sections, room=room, into=self._scratch)
            if isinstance(view.obj, bytearray) and view.obj is not self._scratch:
                self._scratch = view.obj  # grown: keep the bigger one
        return KVState(
            key=self._compat_key,
            tokens=tokens,
            next_token=next_token,
            payload=view[room:].toreadonly(),
            model=self._model_name,
            source=view,
        )

    # -- states kept as chunks (DAG states, checkpoints, migrations) -------------------

    def chunked(self, state: KVState, *, keep_tail: bool = True) -> ChunkedState:
        """The state as chunk keys plus its tail (``keep_tail`` False: a checkpoint's,
        whose few tail tokens a resume computes), its chunks put into the store first,
        on disk before this returns (a record will name them). Blocks: any thread but
        the scheduler's. ``KvLayoutError`` when the state does not split."""
        state.check_compatible(self._compat_key)
        section = parse(state.payload)
        if section.n_tokens != len(state.tokens) or section.layers != self._layers:
            raise KvLayoutError("the state's cells are not its tokens in this engine's layers")
        c = self.chunk_tokens
        keys = self.keys(state.tokens)
        for i, key in enumerate(keys):
            if not self.store.on_disk(key):
                self.store.put(key, section.cut(i * c, (i + 1) * c, seq_id=0), c, durable=True)
        full = len(keys) * c
        tail_tokens = len(state.tokens) - full if keep_tail else 0
        tail = section.cut(full, full + tail_tokens, seq_id=0) if tail_tokens else b""
        return ChunkedState(
            key=state.key,
            tokens=list(state.tokens),
            next_token=state.next_token,
            chunk_tokens=c,
            chunks=tuple(keys),
            tail=tail,
            tail_tokens=tail_tokens,
            model=state.model or self._model_name,
        )

    def whole(self, chunked: ChunkedState) -> tuple[KVState | None, list[int]]:
        """A chunked state back as a KV state of what the store still holds of it, and
        the tokens after those that a continuation must compute (none when the chunks and
        the tail are all there; the tail and whatever followed a missing or corrupt
        chunk otherwise). Blocks on the disk: any thread but the scheduler's."""
        chunked.check_compatible(self._compat_key)
        if chunked.chunk_tokens != self.chunk_tokens:
            raise StateError(
                f"the state is kept in {chunked.chunk_tokens}-token chunks; this engine's"
                f" are {self.chunk_tokens}"
            )
        sections = self._sections(self.store.read(chunked.chunks))
        if len(sections) == len(chunked.chunks) and chunked.tail_tokens:
            try:
                tail: KvSection | None = parse(chunked.tail)
            except KvLayoutError:
                tail = None
            full = len(sections) * self.chunk_tokens
            if (
                tail is not None
                and tail.layers == self._layers
                and tail.n_tokens
                and (int(tail.cells["pos"][0]) == full)
            ):
                sections.append(tail)
        covered = min(sum(s.n_tokens for s in sections), len(chunked.tokens))
        rest = chunked.tokens[covered:]
        pending = [chunked.next_token] if chunked.next_token is not None else []
        if covered == 0:
            return None, rest + pending
        if rest:  # the KV ends before the tokens do: the rest is a prompt to compute
            return self._joined(sections, chunked.tokens[:covered], None), rest + pending
        return self._joined(sections, chunked.tokens, chunked.next_token), []

    # -- spilling -----------------------------------------------------------------------

    def spill(
        self, slot: Slot, *, with_tail: bool = True, payload: memoryview | bytes | None = None
    ) -> None:
        """Put the slot's full chunks the store lacks into it, and its tail unless
        ``with_tail`` is False (a request that exported its state keeps its tail in it):
        one export here (none when ``payload``, the slot's state as its request exported
        it, is given), the cutting in the store's writer thread."""
        slot_tokens = list(slot.tokens)
        keys = self.keys(slot_tokens)
        held = self.store.chain_length(keys)
        c = self.chunk_tokens
        end = list(slot.tokens[len(keys) * c :])
        parent = keys[-1] if keys else self.root.hex()
        tail = tail_key(parent, end) if with_tail and len(end) >= MIN_TAIL_TOKENS else None
        if held == len(keys) and (tail is None or self.store.holds(tail)):
            return
        if payload is None:
            try:
                payload = self._kv.export_payload(slot)
            except PcrtError:  # a chunk not stored is only computed again
                return
        exported = payload

        def cut_and_put() -> None:
            section = parse(exported)
            for i in range(held, len(keys)):
                after = (keys[i - 1] if i else self.root.hex(), slot_tokens[i * c : (i + 1) * c])
                data = section.cut(i * c, (i + 1) * c, seq_id=0)
                self.store.put(keys[i], data, c, follows=after)
            if tail is not None:
                full = len(keys) * c
                data = section.cut(full, full + len(end), seq_id=0)
                self.store.put(tail, data, len(end), follows=(parent, end))

        self.store.defer(cut_and_put)


def whole_state(chunked: ChunkedState, store: ChunkStore) -> KVState:
    """A chunked state as a whole one, for a person or a program outside pcrt (a
    download, ``pcrt state export``): its chunks read from ``store`` and joined with its
    tail. ``StateError`` when a chunk is gone or does not fit (evicted, corrupt). Blocks
    on the disk; needs no engine."""
    data = store.read(chunked.chunks)
    if len(data) < len(chunked.chunks):
        raise StateError(
            f"{len(chunked.chunks) - len(data)} of its {len(chunked.chunks)} KV chunks are"
            " gone from the chunk store (evicted, or corrupt)"
        )
    try:
        sections = [parse(d) for d in data]
        if chunked.tail_tokens:
            sections.append(parse(chunked.tail))
        if not sections:
            raise StateError("the state holds no KV")
        payload = join(sections)
    except KvLayoutError as exc:
        raise StateError(f"its chunks do not join: {exc}") from None
    covered = chunked.covered
    done = covered == len(chunked.tokens)
    return KVState(
        key=chunked.key,
        tokens=chunked.tokens[:covered],
        next_token=chunked.next_token if done else None,
        payload=payload,
        model=chunked.model,
    )


def self_test(
    ctx: Any, kv: SlotKV, slot: Slot, *, n_batch: int, n_vocab: int, chunk_tokens: int
) -> KvSection:
    """Whether this engine's KV state splits into chunks and joins back exactly (see the
    module doc); the parsed test state (its layers are the engine's) or ``KvLayoutError``
    saying why not. Uses ``slot``, and leaves it empty."""
    n = min(2 * chunk_tokens + 5, kv.context_per_slot - 1)
    if n <= chunk_tokens:
        raise KvLayoutError(f"a slot's context ({kv.context_per_slot}) is under two chunks")
    if not kv.portable:
        raise KvLayoutError("the model's cache is not one plain KV section (sliding window?)")
    tokens = [(7 * i + 11) % n_vocab for i in range(n)]  # any ids the vocabulary has
    kv.trim(slot.seq_id, 0)
    slot.tokens = []
    try:
        _decode(ctx, tokens, slot.seq_id, n_batch)
        slot.tokens = tokens
        exported = bytes(kv.export_payload(slot))
        section = parse(exported)
        bounds = [0, chunk_tokens, 2 * chunk_tokens, n]
        parts = [parse(section.cut(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
        if bytes(join(parts)) != exported:
            raise KvLayoutError("chunks joined back differ from the state they were cut from")
        kv.restore(slot, KVState(kv.compat_key, tokens, None, bytes(join(parts))))
        if bytes(kv.export_payload(slot)) != exported:
            raise KvLayoutError("llama.cpp exports a joined state differently after a restore")
        return section
    finally:
        kv.trim(slot.seq_id, 0)
        slot.tokens = []


def _decode(ctx: Any, tokens: list[int], seq_id: int, n_batch: int) -> None:
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for start in range(0, len(tokens), n_batch):
            piece = tokens[start : start + n_batch]
            for i, token in enumerate(piece):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = False
            batch.n_tokens = len(piece)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise KvLayoutError("the self-test's decode failed")
    finally:
        llama_cpp.llama_batch_free(batch)
