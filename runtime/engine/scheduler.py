"""The scheduler: continuous batching over slots, on the engine's one scheduler thread.

Everything here runs on that thread, which owns the llama.cpp context; nothing here is
called from anywhere else, except the read-only counters (``slot_infos``, ``busy_slots``,
``queue_depth``) that other threads may read at any time. The loop (``run``):

1. drain the inbox (``handoff``): a ``Submit`` queues a job, a ``Cancel`` finishes one, an
   ``Embed`` queues an embedding job, a ``Call`` runs a function here, a ``Close`` fails
   what is pending and stops;
2. admit waiting jobs, first come first served, while there are free slots for them:
   pick slots and reuse a cached prefix (``prefix`` decides, ``kv`` copies);
3. one batched decode step: the next token of every decoding sequence, in seq-id order,
   plus a chunk of any pending prompt, in one ``llama_decode``; then sample each sequence
   from its own logits row with its own sampler chain;
4. embed one text of the oldest embedding job, if any: an embedding request of hundreds
   of texts runs between decode steps, one text each, so running streams keep getting
   tokens, and a job whose caller left (or a ``Close``) stops it after the current text;
5. hand the step's events to the callers' event loops (``handoff.Deliveries``).

A job is one request; its branches are the ``n`` sequences of a fork, one slot each. The
job's first branch (its main slot) computes the prompt; when the prompt is in, its KV is
copied into the other branches' slots and every branch samples on its own. A job that
shares a long prefix with another job's running prefill may ``follow`` it: wait until the
leader has computed that prefix, copy it, and prefill only the rest.

Each slot has its own KV stream of ``context`` cells (``kv_unified`` off). In a unified
pool a sequence's attention runs over cells interleaved with other sequences', and the
changed summation order flips greedy near-ties: with separate streams a request decodes
exactly as it would alone, and exactly as llama-cpp-python's ``Llama`` decodes it. That
is also why copies between slots go through sequence state (see ``kv``). A unified pool
would let a fork's branches and shared prefixes hold cells once (``llama_memory_seq_cp``
within one stream), but at that price, and the KV chunk store already keeps shared
prefixes once in RAM and on disk; a fork exports its prompt once and restores it into
each branch (``SlotKV.copy_to_many``), which measured 0.94-1.00 of llama.cpp's own
``seq_cp`` fork over the same independent runs (``bench.kv``).

With the chunk store (``chunk_cache``), admission restores the longest prefix of the
prompt that the store holds when that beats the chosen slot's (from RAM at once, from
disk while the job waits on a reader thread), and a finished request's slot spills its
new chunks (cut and stored by the store's writer thread).

The decode step is the hot path, measured against llama-cpp-python by ``bench.engine``:
no allocation, lookup or type test in it that the work does not need.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from pcrt.cache.chunks import Chunk
from pcrt.runtime.engine.chunk_cache import ChunkCache, Hit
from pcrt.runtime.engine.config import EngineConfig
from pcrt.runtime.engine.grammar_compiler import GrammarCompiler
from pcrt.runtime.engine.handoff import (
    Call,
    Cancel,
    Close,
    Deliveries,
    Embed,
    EmbeddingJob,
    Inbox,
    Message,
    Outgoing,
    RequestHandle,
    Submit,
)
from pcrt.runtime.engine.kv import SlotKV
from pcrt.runtime.engine.llama_model import LlamaModel
from pcrt.runtime.engine.prefix import (
    by_value,
    choose_donor,
    choose_leader,
    choose_slots,
    common_prefix,
)
from pcrt.runtime.engine.requests import (
    CheckpointEvent,
    Choice,
    Completion,
    FinishEvent,
    FinishReason,
    SlotInfo,
    TokenEvent,
)
from pcrt.runtime.engine.sampling import (
    Guide,
    Sampler,
    SamplingParams,
    Trigger,
    logits_row,
    resolve_seed,
    token_logprob,
)
from pcrt.runtime.engine.slots import Slot
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.engine.textstream import TextStream
from pcrt.runtime.errors import EngineClosed, InvalidRequest, PcrtError, StateError

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Branch:
    choice: Choice
    slot: Slot
    sampler: Sampler | None = None
    stream: TextStream | None = None
    pending: int | None = None  # sampled, not yet decoded
    batch_index: int = -1
    checkpointed: int = 0  # tokens it had generated at its last checkpoint

    @property
    def active(self) -> bool:
        return self.choice.finish_reason is None


@dataclass(eq=False)
class _Job:
    handle: RequestHandle
    params: SamplingParams
    prompt: list[int]
    branches: list[_Branch] = field(default_factory=list)
    prefill_pos: int = 0
    chunk: int = 0  # prompt tokens in the current batch
    logits_row: int = -1  # batch row of the last prompt token, once it is in a batch
    t_admitted: float = 0.0
    t_first_token: float | None = None
    outbox: list[Outgoing] = field(default_factory=list)
    # (leader, tokens): the leader is prefilling this job's first ``tokens`` prompt tokens
    # right now; this job waits for them and copies them instead of computing them twice
    follows: tuple[_Job, int] | None = None
    # chunks of its prompt being read from the store's disk tier: it waits for them
    fetching: tuple[concurrent.futures.Future[list[Chunk]], Hit] | None = None
    failed: bool = False  # stopped with an error mid-step: its other branches sample no more
    shown: frozenset[int] = frozenset()  # special tokens its text shows (params.shown_specials)

    @property
    def prefilling(self) -> bool:
        return self.prefill_pos < len(self.prompt)

    @property
    def waiting(self) -> bool:
        """Its prefill waits on another job's or on the store's disk."""
        return self.follows is not None or self.fetching is not None


class Scheduler:
    """Slots, jobs and the decode loop of one context."""

    def __init__(
        self,
        ctx: Any,
        *,
        model: LlamaModel,
        config: EngineConfig,
        context_per_slot: int,
        kv: SlotKV,
        grammars: GrammarCompiler,
        inbox: Inbox,
        name: str,
        embed: Callable[[list[int]], list[float]],
        chunks: ChunkCache | None = None,
    ) -> None:
        self._ctx = ctx
        self._chunks = chunks
        self.model = model
        self.config = config
        self.context_per_slot = context_per_slot
        self._kv = kv
        self._grammars = grammars
        self._inbox = inbox
        self._name = name
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self.slots = [Slot(i) for i in range(config.parallel)]
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._embed = embed  # one text's tokens to its vector (``embeddings.Embedder``)
        self._embedding: deque[EmbeddingJob] = deque()
        deliveries = Deliveries()
        # bound once: every step sends and dispatches
        self._send = deliveries.send
        self._dispatch = deliveries.dispatch

    # -- read from any thread -----------------------------------------------------------

    def slot_infos(self) -> list[SlotInfo]:
        return [SlotInfo(s.seq_id, s.busy, len(s.tokens)) for s in self.slots]

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    def use_chunks(self, chunks: ChunkCache | None) -> None:
        """The chunk store as this engine uses it (its self-test passed); called on this
        thread before ``run``."""
        self._chunks = chunks

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve the inbox until ``Close``. Raises only on a bug; the caller then calls
        ``shutdown`` with the error every pending caller gets."""
        while True:
            idle = not self._running and not self._waiting and not self._embedding
            try:
                message = self._inbox.get() if idle else self._inbox.get_nowait()
            except queue.Empty:
                message = None
            while message is not None:
                if isinstance(message, Close):
                    self.shutdown()
                    return
                self._handle(message)
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = None
            self._admit()
            self._take_from_leaders()
            self._take_fetched()
            if self._running:
                self._step()
            if self._embedding:
                self._embed_next()
            self._dispatch()

    def _handle(self, message: Message) -> None:
        match message:
            case Submit(handle=handle):
                self._waiting.append(self._new_job(handle))
            case Cancel(request_id=request_id):
                self._cancel(request_id)
            case Embed(job=job):
                self._embedding.append(job)
            case Call():
                message.run()

    def _new_job(self, handle: RequestHandle) -> _Job:
        request = handle.request
        return _Job(
            handle=handle,
            params=request.sampling,
            prompt=handle.prompt_tokens,
            branches=[_Branch(Choice(i), slot=self.slots[0]) for i in range(request.n)],
        )

    def shutdown(self, error: PcrtError | None = None) -> None:
        """Fail every pending request and call (``EngineClosed`` unless ``error``)."""
        error = error or EngineClosed(f"engine for {self._name!r} shut down")
        for job in [*self._running, *self._waiting]:
            self._free_job(job)
            self._send(job.handle, [error])
        self._running.clear()
        self._waiting.clear()
        for embedding in self._embedding:
            embedding.fail(error)
        self._embedding.clear()
        while True:  # fail calls and submissions that raced with close
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, Submit):
                self._send(message.handle, [error])
            elif isinstance(message, Embed):
                message.job.fail(error)
            elif isinstance(message, Call):
                message.fail(error)
        self._dispatch()

    def free(self) -> None:
        """Free the batch (after the thread has stopped)."""
        llama_cpp.llama_batch_free(self._batch)

    # -- idle slots (through Call, between steps) -----------------------------------------

    def slot(self, seq_id: int) -> Slot:
        if not 0 <= seq_id < len(self.slots):
            raise InvalidRequest(f"no slot {seq_id}: slots are 0..{len(self.slots) - 1}")
        return self.slots[seq_id]

    def export_idle(self, seq_id: int) -> KVState:
        """The KV state of an idle slot (what its last request left there)."""
        slot = self.slot(seq_id)
        if slot.busy:
            raise StateError(f"slot {seq_id} is busy; export it when its request ends")
        return self._kv.export(slot, next_token=None)

    def import_idle(self, state: KVState) -> int:
        """Load a (checked) state into the idle slot with least to lose; its seq id."""
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            raise StateError("every slot is busy; retry when one is free")
        slot = by_value(idle)[0]
        self._kv.restore(slot, state)
        return slot.seq_id

    def clear_idle(self) -> int:
        """Drop the cached KV of every idle slot; how many tokens were dropped."""
        dropped = 0
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                self._kv.trim(slot.seq_id, 0)
                dropped += len(slot.tokens)
                slot.tokens = []
        return dropped

    # -- embeddings, one text per step ------------------------------------------------

    def _embed_next(self) -> None:
        """One text of the oldest embedding job (its own context: the slots' KV stays)."""
        job = self._embedding[0]
        if job.future.cancelled():  # the caller left: the rest is not embedded
            self._embedding.popleft()
            return
        try:
            job.vectors.append(self._embed(job.inputs[len(job.vectors)]))
        except Exception as exc:  # one bad job must not take the scheduler down
            if not isinstance(exc, PcrtError):
                log.exception("could not embed for an embedding request")
                exc = PcrtError(f"the embedding failed: {type(exc).__name__}")
            self._embedding.popleft()
            job.fail(exc)
            return
        if len(job.vectors) == len(job.inputs):
            self._embedding.popleft()
            job.succeed()

    # -- admission and prefix reuse -------------------------------------------------------

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            free = [s for s in self.slots if not s.busy]
            if len(free) < len(job.branches):
                return  # FIFO: a fork waiting for slots is not overtaken
            self._waiting.popleft()
            try:
                self._place(job, free)
            except Exception as exc:  # one bad request must not take the scheduler down
                if not isinstance(exc, PcrtError):
                    log.exception("could not start request %s", job.handle.id)
                    exc = PcrtError(f"the request could not start: {type(exc).__name__}")
                self._free_job(job)
                for br in job.branches:
                    if br.sampler is not None:
                        br.sampler.free()
                        br.sampler = None
                    br.slot.busy = False
                self._send(job.handle, [exc])
                continue
            self._running.append(job)

    def _place(self, job: _Job, free: list[Slot]) -> None:
        """Pick slots, restore a state or reuse the longest cached prefix."""
        prompt = job.prompt
        chosen = choose_slots(prompt, free, len(job.branches))
        for branch, slot in zip(job.branches, chosen, strict=True):
            branch.slot = slot
            slot.busy = True
        main = chosen[0]
        request = job.handle.request
        state = request.state or request.context_state
        if state is not None and common_prefix(main.tokens, prompt) < len(state.tokens):
            self._kv.restore(main, state)
        common = common_prefix(main.tokens, prompt)
        donor = choose_donor(prompt, self.slots, main, common)
        if donor is not None:
            source, shared = donor
            self._kv.copy(source, main, shared)
            common = len(main.tokens)
        if self._chunks is not None and state is None:
            hit = self._chunks.lookup(prompt, common)
            if hit is not None and hit.in_ram:
                chunks = self._chunks.store.take_from_ram(hit.all_keys)
                common = self._restore_chunks(main, prompt, hit, chunks, common)
            elif hit is not None:  # read off this thread; the job waits (``_take_fetched``)
                job.fetching = (self._chunks.store.fetch(hit.all_keys), hit)
        common = min(common, len(prompt) - 1)  # the last prompt token must be decoded for logits
        if not self._kv.trim(main.seq_id, common):
            self._kv.trim(main.seq_id, 0)  # partial removal unsupported (e.g. SWA): start over
            common = 0
        del main.tokens[common:]
        job.prefill_pos = common
        job.handle.cached_tokens = common
        if state is None and job.fetching is None:
            job.follows = choose_leader(
                prompt,
                common,
                (j for j in self._running if j.prefilling and not j.waiting),
            )
        job.t_admitted = time.perf_counter()
        job.shown = frozenset(
            token
            for token in map(self.model.special_token, job.params.shown_specials)
            if token is not None
        )
        constraint = job.params.constraint
        compiled = None
        if constraint is not None:
            # pinned at submit; compiled here only for a caller that skipped prepare
            compiled = job.handle.grammar or self._grammars.compile(constraint)
            job.handle.grammar_seconds = compiled.seconds
        for branch in job.branches:
            seed = resolve_seed(job.params.seed, branch.choice.index)
            guide = None
            if compiled is not None:  # each branch its own place in the grammar
                triggers, anchored = job.params.grammar_triggers, job.params.anchored_triggers
                trigger = Trigger(triggers, self.model.token_bytes, anchored) if triggers else None
                guide = Guide(compiled.matcher, self.model.n_vocab, trigger)
            branch.sampler = Sampler(
                job.params,
                self.model.vocab,
                self.model.n_vocab,
                seed,
                self.context_per_slot,
                guide,
            )
            generated = request.generated_prefix
            branch.sampler.accept_prompt(prompt[: len(prompt) - len(generated)])
            branch.sampler.accept_generated(generated)
            branch.stream = TextStream(job.params.stop)

    def _take_from_leaders(self) -> None:
        """Followers whose leader has computed their shared prefix copy it and go on
        prefilling from there; one whose leader stopped short prefills for itself."""
        for job in self._running:
            if job.follows is None:
                continue
            leader, shared = job.follows
            source = leader.branches[0].slot
            if common_prefix(source.tokens, job.prompt) >= shared:
                main = job.branches[0].slot
                self._kv.copy(source, main, shared)  # empty when it cannot trim (SWA)
                job.prefill_pos = job.handle.cached_tokens = len(main.tokens)
                job.follows = None
            elif leader not in self._running or not leader.prefilling:
                job.follows = None  # cancelled or failed before it got there

    def _restore_chunks(
        self, main: Slot, prompt: list[int], hit: Hit, chunks: list[Chunk], cached: int
    ) -> int:
        """Restore the store's chunks of ``prompt`` into ``main`` when they hold more than
        its ``cached`` tokens; how many prompt tokens it holds then."""
        assert self._chunks is not None
        state = self._chunks.state_of(prompt, hit, chunks)
        if state is None or len(state.tokens) <= cached:
            return cached
        try:
            self._kv.restore(main, state)
        except PcrtError:  # llama.cpp refused it and the slot is empty: compute it all
            log.exception("could not restore KV chunks into slot %d", main.seq_id)
        return len(main.tokens)

    def _take_fetched(self) -> None:
        """Jobs whose chunks came off the disk restore them and prefill the rest; one
        whose read failed (a chunk missing or corrupt) computes what it lacks."""
        for job in self._running:
            if job.fetching is None or not job.fetching[0].done():
                continue
            fetching, hit = job.fetching
            job.fetching = None
            try:
                chunks = fetching.result()
            except Exception:  # an unreadable disk is a miss, not a failed request
                log.exception("could not read KV chunks for request %s", job.handle.id)
                continue
            main = job.branches[0].slot
            held = self._restore_chunks(main, job.prompt, hit, chunks, job.prefill_pos)
            job.prefill_pos = job.handle.cached_tokens = held

    # -- one batched decode step -----------------------------------------------------

    def _step(self) -> None:
        batch = self._batch
        n = 0
        decoding = [
            (job, br)
            for job in self._running
            if not job.prefilling
            for br in job.branches
            if br.active and br.pending is not None
        ]
        # in seq-id order: with a KV stream per slot, llama.cpp puts only consecutive,
        # increasing seq ids into one ubatch, so [2, 0, 1, 3] would cost two forward passes
        # (measured in bench.dag's shared-context DAG: 4-wide steps 47-52 ms -> 43 ms)
        decoding.sort(key=lambda pair: pair[1].slot.seq_id)
        for _job, br in decoding:
            assert br.pending is not None
            n = self._add(n, br.pending, len(br.slot.tokens), br.slot.seq_id, True)
            br.batch_index = n - 1
        prefilling: list[_Job] = []
        budget = (
            self.config.n_batch
            if not decoding
            else min(self.config.n_batch, n + self.config.prefill_chunk)
        )
        for job in self._running:
            if not job.prefilling or job.waiting or n >= budget:
                continue
            main = job.branches[0].slot
            take = min(budget - n, len(job.prompt) - job.prefill_pos)
            last = len(job.prompt) - 1
            for pos in range(job.prefill_pos, job.prefill_pos + take):
                if pos == last:
                    job.logits_row = n
                n = self._add(n, job.prompt[pos], pos, main.seq_id, pos == last)
            job.chunk = take
            prefilling.append(job)
        if n == 0:  # every running job waits on another (cannot last: see choose_leader)
            reads = [j.fetching[0] for j in self._running if j.fetching is not None]
            if reads:  # or on the disk: sleep until a read ends, not spin
                concurrent.futures.wait(reads, 0.05, concurrent.futures.FIRST_COMPLETED)
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            self._fail_step(rc, decoding, prefilling)
            return
        now = time.perf_counter()
        for job, br in decoding:
            assert br.pending is not None
            br.slot.tokens.append(br.pending)
            br.pending = None
            self._sample(job, br, br.batch_index, now)
        for job in prefilling:
            main = job.branches[0].slot
            main.tokens.extend(job.prompt[job.prefill_pos : job.prefill_pos + job.chunk])
            job.prefill_pos += job.chunk
            if not job.prefilling:
                self._start_decoding(job, job.logits_row)
        self._flush_events()

    def _add(self, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch = self._batch
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _start_decoding(self, job: _Job, logits_index: int) -> None:
        """The prompt is in: copy its KV into the fork's other slots and sample each."""
        main = job.branches[0].slot
        if len(job.branches) > 1:
            others = [br.slot for br in job.branches[1:]]
            self._kv.copy_to_many(main, others, len(main.tokens))
        now = time.perf_counter()
        for br in job.branches:
            if job.params.max_tokens == 0:
                self._finish(job, br, "length")
            else:
                self._sample(job, br, logits_index, now)

    def _sample(self, job: _Job, br: _Branch, batch_index: int, now: float) -> None:
        if job.failed:
            return
        assert br.sampler is not None and br.stream is not None
        try:
            token = br.sampler.sample(self._ctx, batch_index)
        except PcrtError as exc:  # a grammar with no way on: this request fails, no other
            self._fail_job(job, exc)
            return
        if job.t_first_token is None:
            job.t_first_token = now
        br.pending = token
        if self.model.is_eog(token):
            self._finish(job, br, "stop")
            return
        br.choice.tokens.append(token)
        logprob = None
        if job.params.logprobs is not None:
            logits = logits_row(self._ctx, batch_index, self.model.n_vocab)
            logprob = token_logprob(logits, token, job.params.logprobs, self.model.token_bytes)
            br.choice.logprobs.append(logprob)
        piece = self.model.token_bytes(token) if token in job.shown else self.model.piece(token)
        text = br.stream.feed(piece)
        br.choice.text += text
        job.outbox.append(TokenEvent(br.choice.index, text, token, logprob))
        guide = br.sampler.guide
        if br.stream.stopped or (guide is not None and guide.ended):
            # a grammar with nothing left but the end: done now, not one decode later
            self._finish(job, br, "stop")
        elif (
            len(br.choice.tokens) >= job.params.max_tokens
            or len(br.slot.tokens) + 1 >= self.context_per_slot  # the context is full
        ):
            self._finish(job, br, "length")
        elif self._checkpoint_due(job, br):
            self._checkpoint(job, br)

    def _checkpoint_due(self, job: _Job, br: _Branch) -> bool:
        """Every ``checkpoint_every`` tokens; with the chunk store, at the first chunk
        boundary after that: the checkpoint is then whole chunks, each written once, and
        a resume restores them all and computes nothing (a tail computed again would be
        computed in another batch shape, and could flip a greedy near-tie)."""
        every = job.handle.request.checkpoint_every
        if not every or len(br.choice.tokens) - br.checkpointed < every:
            return False
        return self._chunks is None or len(br.slot.tokens) % self._chunks.chunk_tokens == 0

    def _checkpoint(self, job: _Job, br: _Branch) -> None:
        br.checkpointed = len(br.choice.tokens)
        try:
            state = self._kv.export(br.slot, next_token=br.pending)
        except PcrtError:  # a missed checkpoint costs recomputation after a crash, no more
            log.exception("could not checkpoint request %s", job.handle.id)
            return
        job.outbox.append(CheckpointEvent(br.choice.index, state, list(br.choice.tokens)))

    # -- finishing, cancelling, failing ---------------------------------------------------

    def _finish(self, job: _Job, br: _Branch, reason: FinishReason) -> None:
        assert br.stream is not None
        tail = br.stream.flush()
        if tail:
            br.choice.text += tail
            job.outbox.append(TokenEvent(br.choice.index, tail, -1))
        br.choice.finish_reason = reason
        if job.handle.request.export_state:
            try:
                br.choice.state = self._kv.export(br.slot, next_token=br.pending)
            except PcrtError:  # the output stands; a missing state only costs a recompute
                log.exception("could not export the KV state of request %s", job.handle.id)
        if self._chunks is not None:
            # before the answer goes (an export costs ~5 ms per 1,000 tokens; a caller
            # that has its answer finds the chunks on their way); from the state the
            # request exported, if it did, whose tail is kept there (a DAG node's)
            state = br.choice.state
            payload = state.payload if state is not None else None
            with_tail = not job.handle.request.export_state
            self._chunks.spill(br.slot, with_tail=with_tail, payload=payload)
        self._release(br)
        stop = br.stream.stopped_by
        job.outbox.append(FinishEvent(br.choice.index, reason, br.choice.text, stop))
        if not any(b.active for b in job.branches):
            self._running.remove(job)
            job.outbox.append(self._completion(job))
            self._send(job.handle, job.outbox)  # it leaves _running, so flush it here
            job.outbox = []

    def _release(self, br: _Branch) -> None:
        if br.sampler is not None:
            br.sampler.free()
            br.sampler = None
        br.slot.busy = False
        br.slot.last_used = time.monotonic()

    def _completion(self, job: _Job) -> Completion:
        now = time.perf_counter()
        first = job.t_first_token
        return Completion(
            id=job.handle.id,
            choices=[b.choice for b in job.branches],
            prompt_tokens=len(job.prompt),
            cached_tokens=job.handle.cached_tokens,
            completion_tokens=sum(len(b.choice.tokens) for b in job.branches),
            t_submitted=job.handle.t_submitted,
            t_first_token=first,
            t_done=now,
            prompt_seconds=(first - job.t_admitted) if first is not None else 0.0,
            grammar_seconds=job.handle.grammar_seconds,
        )

    def _fail_step(
        self, rc: int, decoding: list[tuple[_Job, _Branch]], prefilling: list[_Job]
    ) -> None:
        jobs = {id(j): j for j in prefilling}
        for job, _ in decoding:
            jobs[id(job)] = job
        error = PcrtError(f"llama_decode failed (code {rc}); the request was stopped")
        log.error("llama_decode returned %d for %d sequences", rc, len(jobs))
        for job in jobs.values():
            for br in job.branches:
                self._kv.trim(br.slot.seq_id, 0)
                br.slot.tokens.clear()
            self._free_job(job)
            self._running.remove(job)
            self._send(job.handle, [error])
        self._flush_events()

    def _fail_job(self, job: _Job, error: PcrtError) -> None:
        """Stop one running job with ``error`` after what it already streamed."""
        log.error("request %s failed: %s", job.handle.id, error)
        job.failed = True
        self._free_job(job)
        self._running.remove(job)
        self._send(job.handle, [*job.outbox, error])
        job.outbox = []

    def _cancel(self, request_id: str) -> None:
        for job in list(self._waiting):
            if job.handle.id == request_id:
                self._waiting.remove(job)
                for br in job.branches:
                    br.choice.finish_reason = "cancelled"
                self._send(job.handle, [self._completion(job)])
                return
        for job in list(self._running):
            if job.handle.id == request_id:
                for br in job.branches:
                    if br.active:
                        self._finish(job, br, "cancelled")
                self._flush_events()
                return

    def _free_job(self, job: _Job) -> None:
        for br in job.branches:
            if br.active and br.slot.busy:
                self._release(br)

    def _flush_events(self) -> None:
        for job in self._running:
            if job.outbox:
                self._send(job.handle, job.outbox)
                job.outbox = []
