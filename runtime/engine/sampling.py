"""Per-request sampling parameters and the llama.cpp sampler chain built from them.

Each request (each fork branch) owns its own chain, so requests decoded in one batch never
share sampler state. The chain order follows llama.cpp's common sampler: grammar, logit
bias, penalties, then top-k, top-p, min-p, temperature and the final pick (greedy at
temperature 0, a seeded distribution otherwise).
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pcrt.runtime.errors import InvalidRequest

__all__ = [
    "MAX_GRAMMAR_DEPTH",
    "MAX_GRAMMAR_RULES",
    "Sampler",
    "SamplingParams",
    "grammar_problem",
    "grammar_shape",
    "resolve_seed",
    "schema_to_grammar",
]


class SamplingParams(BaseModel):
    """What a caller may set per request. Defaults follow llama.cpp's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    penalty_last_n: int = Field(default=64, ge=-1)
    seed: int | None = None
    max_tokens: int = Field(default=256, ge=0)
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = {}
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingParams:
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give either json_schema or grammar, not both")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(math.isnan(bias) for bias in self.logit_bias.values()):
            raise ValueError("a logit_bias value is NaN")
        # the grammar's shape is checked by the sampler that takes it (``Sampler._build``),
        # in ``prepare``: a thread, not the event loop that builds these (0.13 s per MB)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def gbnf(self) -> str | None:
        """The grammar constraining this request, if any (a JSON schema becomes GBNF)."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is not None:
            return schema_to_grammar(self.json_schema)
        return None


# llama.cpp parses nested groups and checks chains of rules by recursion: some 20,000
# nested ( ) or 200,000 chained rules run its thread out of stack and kill the whole
# process, not just the request. Real grammars (a JSON schema's too) stay far below.
MAX_GRAMMAR_DEPTH = 1000  # nested ( ) groups
MAX_GRAMMAR_RULES = 5000


def grammar_problem(gbnf: str) -> str | None:
    """Why llama.cpp must not be given this grammar, or None."""
    depth, rules = grammar_shape(gbnf)
    if depth > MAX_GRAMMAR_DEPTH:
        return f"the grammar nests groups {depth} deep; at most {MAX_GRAMMAR_DEPTH}"
    if rules > MAX_GRAMMAR_RULES:
        return f"the grammar has {rules} rules; at most {MAX_GRAMMAR_RULES}"
    return None


def grammar_shape(gbnf: str) -> tuple[int, int]:
    """How deeply a GBNF text nests ``( )`` groups and how many rules (``::=``) it has,
    outside strings, character classes and comments."""
    depth = deepest = rules = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in '"[<':  # a string, a character class, a token literal (<think>, <[42]>)
            close = {'"': '"', "[": "]", "<": ">"}[c]
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < n and gbnf[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)  # a stray ")" must not hide the nesting after it
        elif gbnf.startswith("::=", i):
            rules += 1
        i += 1
    return deepest, rules


def schema_to_grammar(schema: dict[str, Any]) -> str:
    """JSON schema to GBNF through llama-cpp-python's converter (a port of llama.cpp's)."""
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions / KeyErrors on bad input
        raise InvalidRequest(f"cannot turn this JSON schema into a grammar: {exc}") from None


class Sampler:
    """One llama.cpp sampler chain. Not thread-safe: the scheduler thread owns it."""

    def __init__(
        self, params: SamplingParams, vocab: Any, n_vocab: int, seed: int, context: int = 4096
    ) -> None:
        self.params = params
        # llama.cpp clamps a negative window to 0 (off); -1 means "the whole context" here
        self.penalty_window = context if params.penalty_last_n < 0 else params.penalty_last_n
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        self._penalties: Any = None
        try:
            self._build(params, vocab, n_vocab, seed)
        except BaseException:
            self.free()
            raise

    def _add(self, sampler: Any) -> Any:
        if not sampler:
            raise InvalidRequest("llama.cpp refused a sampler for these parameters")
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)
        return sampler

    def _build(self, p: SamplingParams, vocab: Any, n_vocab: int, seed: int) -> None:
        gbnf = p.gbnf()
        if gbnf is not None:
            problem = grammar_problem(gbnf)  # a JSON schema's grammar too
            if problem is not None:
                raise InvalidRequest(problem)
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
            if not grammar:
                raise InvalidRequest("the grammar does not parse (GBNF syntax error)")
            self._add(grammar)
        if p.logit_bias:
            bad = [t for t in p.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise InvalidRequest(f"logit_bias names tokens outside the vocabulary: {bad}")
            arr = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias.items()):
                arr[i].token = token  # type: ignore[assignment]
                arr[i].bias = bias
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            self._penalties = self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    self.penalty_window,
                    p.repeat_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                )
            )
        if p.greedy:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(p.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed prompt tokens to the penalties (not the grammar, which constrains output only)."""
        if self._penalties is None:
            return
        window = tokens[max(0, len(tokens) - self.penalty_window) :]
        for token in window:
            llama_cpp.llama_sampler_accept(self._penalties, token)

    def accept_generated(self, tokens: tuple[int, ...] | list[int]) -> None:
        """Replay tokens this sequence already generated (a resume) through the whole chain:
        the grammar advances past them and the penalties count them."""
        for token in tokens:
            llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: Any, batch_index: int) -> int:
        """Pick the next token from the logits at ``batch_index`` and accept it."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))

    def free(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def resolve_seed(seed: int | None, branch: int) -> int:
    """Branch i of a seeded fork uses seed + i: reproducible, and branches differ."""
    base = random.getrandbits(32) if seed is None else seed
    return (base + branch) & 0xFFFFFFFF
