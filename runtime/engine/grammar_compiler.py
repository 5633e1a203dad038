"""Compiling constraints for one model: llguidance's tokenizer, matchers, their cache.

A compiled ``LLMatcher`` is kept pristine in an LRU keyed by the grammar's sha256; each
sequence gets a ``deep_copy`` (8-12 µs) and advances its own. So the same schema compiles
once per loaded model, however many requests and fork branches use it.

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
from typing import Any, TypeVar

from llguidance import LLMatcher, LLTokenizer
from llguidance.llamacpp import lltokenizer_from_vocab

from pcrt.runtime.engine.constraints import Constraint, ConstraintInvalid
from pcrt.runtime.engine.llama_model import LlamaModel

__all__ = ["COMPILE_SECONDS", "GrammarCompiler", "check_compiles", "on_big_stack"]

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


class GrammarCompiler:
    """One model's compiled constraints. Thread-safe: ``prepare`` threads compile, the
    scheduler thread takes copies."""

    def __init__(self, model: LlamaModel, capacity: int = CACHED_GRAMMARS) -> None:
        self._model = model
        self._capacity = capacity
        self._lock = threading.Lock()
        self._tokenizer: LLTokenizer | None = None
        # key -> (pristine matcher, seconds its compile took)
        self._matchers: OrderedDict[str, tuple[LLMatcher, float]] = OrderedDict()

    def tokenizer(self) -> LLTokenizer:
        """Built on first use (0.24 s, 38 MB): models never asked for a constraint pay
        nothing. The caller must hold the model (``ModelUsers``): it reads the vocab."""
        with self._lock:
            if self._tokenizer is None:
                model = self._model
                # every end-of-generation token ends a value, not only EOS: SmolLM2's are
                # 0, 2 and 4, and the chat's own end (<|im_end|>) is one of them
                eog = [t for t in range(model.n_vocab) if model.is_eog(t)]
                self._tokenizer = lltokenizer_from_vocab(model.vocab, eos_token=eog)
            return self._tokenizer

    def compile(self, constraint: Constraint) -> tuple[LLMatcher, float]:
        """The pristine matcher of ``constraint``, compiled once (``ConstraintInvalid`` if
        it does not compile), and the seconds that compile took. Never advance it:
        ``matcher_for`` hands out copies."""
        with self._lock:
            entry = self._matchers.get(constraint.key)
            if entry is not None:
                self._matchers.move_to_end(constraint.key)
                return entry
        tokenizer = self.tokenizer()
        started = time.perf_counter()
        matcher = _run(constraint, COMPILE_SECONDS, _compile, tokenizer, constraint.grammar)
        seconds = time.perf_counter() - started
        if matcher.is_error():
            raise constraint.explain(matcher.get_error())
        log.info(
            "compiled a %s constraint (%s) in %.1f ms",
            constraint.source,
            constraint.key[:12],
            seconds * 1000,
        )
        with self._lock:
            self._matchers[constraint.key] = (matcher, seconds)
            while len(self._matchers) > self._capacity:
                self._matchers.popitem(last=False)
        return matcher, seconds

    def matcher_for(self, constraint: Constraint) -> tuple[LLMatcher, float]:
        """A fresh matcher of its own for one sequence, and its grammar's compile seconds
        (compiled now if it is not in the cache, which ``prepare`` makes rare: only when
        64 other grammars came between)."""
        matcher, seconds = self.compile(constraint)
        return matcher.deep_copy(), seconds

    def cached(self) -> int:
        with self._lock:
            return len(self._matchers)


def _compile(tokenizer: LLTokenizer, grammar: str) -> LLMatcher:
    return LLMatcher(tokenizer, grammar, log_level=0)
