"""What a request goes through before it takes a slot: its chat template, its tokens, the
checks that can refuse it, the sampler chain built once to prove its parameters hold, and
its grammar compiled (``grammar_compiler``: cached, so the scheduler only takes a copy).

``Preparer`` runs on the caller's thread, never the scheduler's. That work can take
seconds (a long prompt's tokens, a large grammar), so the server and the DAG executor run
it in a worker thread (``Engine.prepare_in_thread``): the event loop never waits on it.
llama.cpp allows that while the scheduler thread decodes: tokenizing only reads the
vocabulary (``llama_model``), a sampler chain is a new object of its own that reads the
vocabulary and touches no context, and a grammar compiles against llguidance's tokenizer,
built once from the vocabulary, which it only reads.

A text that cannot fit is refused before it is tokenized, by the vocabulary's lower bound
on its tokens (``bounds``), and a text that passes the bound is tokenized with a ceiling
(``LlamaModel.tokenize(at_most=...)``): either way a 30 MB prompt costs no gigabyte.

``ModelUsers`` counts the threads inside a ``Preparer``, so that closing the engine waits
for them before it frees the model they read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pcrt.runtime.engine.chat import ChatRenderer
from pcrt.runtime.engine.checks import check_open, check_prompt, check_slots, prompt_too_long
from pcrt.runtime.engine.grammar_compiler import GrammarCompiler
from pcrt.runtime.engine.llama_model import LlamaModel, TooManyTokens
from pcrt.runtime.engine.requests import GenerateRequest
from pcrt.runtime.engine.sampling import Sampler
from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.errors import ContextLengthExceeded, InvalidRequest, StateError

__all__ = ["ModelUsers", "Preparer"]


class ModelUsers:
    """Threads that use the model outside the scheduler thread; ``close`` waits for them
    and refuses newcomers (``EngineClosed``), so the model is never freed under them."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._changed = threading.Condition()
        self._count = 0
        self._closed = False

    @contextmanager
    def using(self) -> Iterator[None]:
        with self._changed:
            check_open(self._closed, self._name)
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def close(self) -> None:
        """Refuse new users and wait until the present ones are done."""
        with self._changed:
            self._closed = True
            self._changed.wait_for(lambda: self._count == 0)


class Preparer:
    """The checks and tokens of one engine's requests; safe to call from any thread but
    the scheduler's, and from several at once."""

    def __init__(
        self,
        model: LlamaModel,
        chat: ChatRenderer,
        *,
        name: str,
        context_per_slot: int,
        parallel: int,
        compat_key: CompatKey,
    ) -> None:
        self.model = model
        self.chat = chat
        self.name = name
        self.context_per_slot = context_per_slot
        self.parallel = parallel
        self.compat_key = compat_key
        self.users = ModelUsers(name)
        self.grammars = GrammarCompiler(model, self.users.using)

    # -- generation -------------------------------------------------------------------

    def tokenize_request(self, request: GenerateRequest) -> list[int]:
        """The prompt tokens a request will run, after its chat template and state.

        A prompt that cannot fit the context is refused here (``ContextLengthExceeded``),
        before its text is tokenized whole: no tokens past the context are ever made."""
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages")
        before = list(request.state.continuation) if request.state is not None else []
        before += self._checked_context(request.context, len(before))
        with self.users.using():
            if request.messages is not None:
                tools = list(request.tools) if request.tools is not None else None
                text = self.chat.render(request.messages, tools)
                # a template that writes the BOS text itself must not get a second BOS
                add_special = not request.context and not (
                    self.model.add_bos and text.startswith(self.chat.bos_token or "\0")
                )
                tokens = self._tokenize_prompt(text, len(before), add_special=add_special)
            elif isinstance(request.prompt, str):
                tokens = self._tokenize_prompt(
                    request.prompt, len(before), add_special=not request.context
                )
            else:
                tokens = list(request.prompt or [])
                if len(before) + len(tokens) >= self.context_per_slot:
                    raise prompt_too_long(
                        len(before) + len(tokens), self.name, self.context_per_slot
                    )
                bad = [t for t in tokens if not 0 <= t < self.model.n_vocab]
                if bad:
                    raise InvalidRequest(
                        f"prompt holds token ids outside the vocabulary: {bad[:5]}"
                    )
        return before + tokens

    def _checked_context(self, context: tuple[int, ...], before: int) -> list[int]:
        """Ollama's context ids, when they are this vocabulary's and leave room."""
        if not context:
            return []
        if before + len(context) >= self.context_per_slot:
            raise prompt_too_long(before + len(context), self.name, self.context_per_slot)
        bad = [t for t in context if not 0 <= t < self.model.n_vocab]
        if bad:
            raise InvalidRequest(
                f"context holds token ids outside this model's vocabulary: {bad[:5]}", "context"
            )
        return list(context)

    def prepare(self, request: GenerateRequest) -> list[int]:
        """Every check a request can fail before any work, and its prompt tokens."""
        check_slots(request.n, self.parallel)
        for given in (request.state, request.context_state):
            if given is not None:
                self.check_state(given)
        constraint = request.sampling.constraint  # its bounds: before any tokenizing
        prompt = self.tokenize_request(request)
        check_prompt(prompt, self.name, self.context_per_slot)
        with self.users.using():
            Sampler(request.sampling, self.model.vocab, self.model.n_vocab, 0).free()
            if constraint is not None:  # compiled here, once: the scheduler takes a copy
                self.grammars.compile(constraint)
        return prompt

    def check_state(self, state: KVState) -> None:
        """StateError unless the state is this engine's kind and its tokens are this
        vocabulary's: a forged header with the right key must not hand llama.cpp ids it
        would index out of bounds."""
        state.check_compatible(self.compat_key)
        ids = [*state.tokens, *([state.next_token] if state.next_token is not None else [])]
        if any(not 0 <= t < self.model.n_vocab for t in ids):
            raise StateError("the state's tokens are outside this model's vocabulary")

    def _tokenize_prompt(self, text: str, before: int, *, add_special: bool) -> list[int]:
        """``text``'s tokens, when ``before`` tokens ahead of them leave room for them and
        one new token; else ``ContextLengthExceeded``, decided as cheaply as possible."""
        room = max(0, self.context_per_slot - 1 - before)
        fewest = self.model.token_bound.fewest_tokens(text)
        if fewest > room:
            raise prompt_too_long(before + fewest, self.name, self.context_per_slot, at_least=True)
        try:
            return self.model.tokenize(
                text, add_special=add_special, parse_special=True, at_most=room
            )
        except TooManyTokens as exc:
            raise prompt_too_long(before + exc.count, self.name, self.context_per_slot) from None

    # -- embeddings ---------------------------------------------------------------------

    def tokenize_inputs(
        self, texts: Sequence[str], max_total_tokens: int | None = None, truncate: bool = False
    ) -> list[list[int]]:
        """Each text's tokens for an embedding: none empty, none over the context (or,
        ``truncate``, each cut to its first context's worth, as Ollama's ``/api/embed``
        does by default), and (with ``max_total_tokens``) not more than that in all;
        refused before tokenizing where the bound already says so."""
        limit = self.context_per_slot
        if truncate:
            return self._truncated_inputs(texts, max_total_tokens)
        bound = self.model.token_bound
        if max_total_tokens is not None:
            fewest = sum(bound.fewest_tokens(text) for text in texts)
            if fewest > max_total_tokens:
                raise _too_many_for_one_request(max_total_tokens, at_least=fewest)
        inputs: list[list[int]] = []
        total = 0
        with self.users.using():
            for i, text in enumerate(texts):
                fewest = bound.fewest_tokens(text)
                if fewest > limit:
                    raise ContextLengthExceeded(
                        f"input {i} has at least {fewest} tokens; at most {limit}"
                    )
                at_most = (
                    limit if max_total_tokens is None else min(limit, max_total_tokens - total)
                )
                try:
                    tokens = self.model.tokenize(
                        text, add_special=True, parse_special=False, at_most=at_most
                    )
                except TooManyTokens as exc:
                    if exc.count > limit:
                        raise ContextLengthExceeded(
                            f"input {i} has {exc.count} tokens; at most {limit}"
                        ) from None
                    assert max_total_tokens is not None  # else at_most is the context
                    raise _too_many_for_one_request(
                        max_total_tokens, at_least=total + exc.count
                    ) from None
                if not tokens:
                    raise InvalidRequest(f"input {i} is empty")
                total += len(tokens)
                inputs.append(tokens)
        return inputs

    def _truncated_inputs(
        self, texts: Sequence[str], max_total_tokens: int | None
    ) -> list[list[int]]:
        """``tokenize_inputs`` with each text cut to the context: the whole text is
        tokenized (bounded by its request body), then its first tokens kept, so each cut
        falls where the model reads a token boundary, not inside a word's bytes."""
        limit = self.context_per_slot
        inputs: list[list[int]] = []
        total = 0
        with self.users.using():
            for i, text in enumerate(texts):
                tokens = self.model.tokenize(text, add_special=True, parse_special=False)[:limit]
                if not tokens:
                    raise InvalidRequest(f"input {i} is empty")
                total += len(tokens)
                if max_total_tokens is not None and total > max_total_tokens:
                    raise _too_many_for_one_request(max_total_tokens, at_least=total)
                inputs.append(tokens)
        return inputs


def _too_many_for_one_request(limit: int, *, at_least: int) -> InvalidRequest:
    return InvalidRequest(
        f"the inputs take at least {at_least} tokens; one request embeds at most {limit}: "
        "split them over several requests"
    )
