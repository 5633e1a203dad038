"""Compiling constraints for one model: llguidance's tokenizer, matchers, their cache.

A compiled ``LLMatcher`` is kept pristine in an LRU keyed by the grammar's sha256; each
sequence gets a ``deep_copy`` (8-12 µs) and advances its own. So the same schema compiles
once per loaded model, however many requests and fork branches use it. ``prepare``
compiles (off the loop); ``Engine.submit`` pins the compiled grammar to the request, so
a long queue cannot evict it before the scheduler thread copies it.

llguidance's compiler recurses over the grammar: about 3 KB of stack per chained rule,
so some 3,000 chained rules overflow a thread's 8 MB and kill the process. Every compile
and every validation therefore runs on a thread made with a 64 MB stack (``on_big_stack``),
and ``constraints`` bounds what reaches it far below what that stack holds (20,000).
There is no compile timeout in llguidance: a compile that outlasts ``COMPILE_SECONDS`` is
a 400, and its thread finishes on its own (the bounds keep that to seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from llguidance import LLMatcher, LLTokenizer
from llguidance.llamacpp import lltokenizer_from_vocab

from pcrt.runtime.engine.constraints import Constraint, ConstraintInvalid
from pcrt.runtime.engine.llama_model import LlamaModel

__all__ = ["COMPILE_SECONDS", "Compiled", "GrammarCompiler", "check_compiles", "on_big_stack"]

T = TypeVar("T")

log = logging.getLogger(__name__)

BIG_STACK = 64 * 1024 * 1024
COMPILE_SECONDS = 10.0
CACHED_GRAMMARS = 64

# threading.stack_size is process-wide: set, start, reset under one lock, so two compiles
# starting at once cannot hand each other the default stack
_STACK_SIZE_LOCK = threading.Lock()


def on_big_stack(fn: Callable[..., T], *args: Any, timeout: float = COMPILE_SECONDS) -> T:
    """``fn(*args)`` on a new thread with a 64 MB stack; TimeoutError after ``timeout``
    (the thread runs on to its end: llguidance cannot be interrupted)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    with _STACK_SIZE_LOCK:
        previous = threading.stack_size(BIG_STACK)
        try:
            worker = threading.Thread(target=run, name="pcrt-grammar", daemon=True)
            worker.start()
        finally:
            threading.stack_size(previous)
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_compiles(constraint: Constraint, timeout: float = COMPILE_SECONDS) -> None:
    """``ConstraintInvalid`` unless llguidance compiles the grammar (no tokenizer needed:
    for callers without a model, such as the DAG validator)."""
    error = _run(constraint, timeout, LLMatcher.validate_grammar, constraint.grammar)
    if error:
        raise constraint.explain(error)


def _run(constraint: Constraint, timeout: float, fn: Callable[..., T], *args: Any) -> T:
    try:
        return on_big_stack(fn, *args, timeout=timeout)
    except TimeoutError:
        raise ConstraintInvalid(
            constraint.source, "", f"it took more than {timeout:g} s to compile; make it smaller"
        ) from None


@dataclass(frozen=True)
class Compiled:
    """A pristine compiled grammar (never advanced: sequences take ``deep_copy``s) and
    what its compile took."""

    matcher: LLMatcher
    seconds: float


class GrammarCompiler:
    """One model's compiled constraints. Thread-safe: ``prepare`` threads compile, the
    event loop pins a compiled one to each request it submits (``cached``), the scheduler
    thread copies it. A grammar being compiled is compiled once however many ask, and one
    that fails is remembered, so the same bad schema costs one compile."""

    def __init__(
        self,
        model: LlamaModel,
        hold_model: Callable[[], AbstractContextManager[object]],
        capacity: int = CACHED_GRAMMARS,
    ) -> None:
        self._model = model
        # held by every compile for its whole length, even one the caller stopped waiting
        # for: llguidance's tokenizer calls llama_tokenize on the model's vocabulary
        self._hold_model = hold_model
        self._capacity = capacity
        self._lock = threading.Lock()
        self._tokenizer: LLTokenizer | None = None
        self._done: OrderedDict[str, Compiled | ConstraintInvalid] = OrderedDict()
        self._compiling: dict[str, Future[Compiled]] = {}

    def tokenizer(self) -> LLTokenizer:
        """Built on first use (0.26 s, 38 MB): models never asked for a constraint pay
        nothing. The caller must hold the model: it reads the vocabulary."""
        with self._lock:
            if self._tokenizer is None:
                model = self._model
                # every end-of-generation token ends a value, not only EOS: SmolLM2's are
                # 0, 2 and 4, and the chat's own end (<|im_end|>) is one of them
                eog = [t for t in range(model.n_vocab) if model.is_eog(t)]
                self._tokenizer = lltokenizer_from_vocab(model.vocab, eos_token=eog)
            return self._tokenizer

    def cached(self, constraint: Constraint) -> Compiled | None:
        """The compiled grammar if it is here now; never compiles."""
        with self._lock:
            entry = self._done.get(constraint.key)
        return entry if isinstance(entry, Compiled) else None

    def compile(self, constraint: Constraint) -> Compiled:
        """``constraint`` compiled, once (``ConstraintInvalid`` if it does not compile)."""
        with self._lock:
            entry = self._done.get(constraint.key)
            if entry is not None:
                self._done.move_to_end(constraint.key)
            future = self._compiling.get(constraint.key)
            owner = entry is None and future is None
            if owner:
                future = self._compiling[constraint.key] = Future()
        if isinstance(entry, ConstraintInvalid):
            raise ConstraintInvalid(entry.source, entry.where, entry.why)
        if entry is not None:
            return entry
        assert future is not None
        if not owner:
            return future.result()  # another thread compiles it right now
        try:
            result: Compiled | ConstraintInvalid = self._compile_now(constraint)
        except ConstraintInvalid as exc:
            result = exc
        except BaseException as exc:  # not remembered: the next request tries again
            with self._lock:
                del self._compiling[constraint.key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._done[constraint.key] = result
            while len(self._done) > self._capacity:
                self._done.popitem(last=False)
            del self._compiling[constraint.key]
        if isinstance(result, ConstraintInvalid):
            future.set_exception(result)
            raise result
        future.set_result(result)
        return result

    def _compile_now(self, constraint: Constraint) -> Compiled:
        with self._hold_model():
            tokenizer = self.tokenizer()

        def held() -> LLMatcher:
            with self._hold_model():
                return LLMatcher(tokenizer, constraint.grammar, log_level=0)

        started = time.perf_counter()
        matcher = _run(constraint, COMPILE_SECONDS, held)
        seconds = time.perf_counter() - started
        if matcher.is_error():
            raise constraint.explain(matcher.get_error())
        log.info(
            "compiled a %s constraint (%s) in %.1f ms",
            constraint.source,
            constraint.key[:12],
            seconds * 1000,
        )
        return Compiled(matcher, seconds)
