"""The hand-off between callers' event loops and the scheduler thread.

Two one-way channels, as llama.cpp's server has its task queue and result queue
(``tools/server/server-queue.cpp``):

- in: callers put typed messages into the engine's ``Inbox`` (a thread-safe queue):
  ``Submit`` a request, ``Cancel`` one, ``Embed`` texts (an ``EmbeddingJob``: one text
  per scheduler step, between decode steps), ``Call`` a function on the scheduler thread
  (it owns the llama.cpp context: exports and imports run there), ``Close`` the engine.
  The scheduler drains the inbox between two decode steps.
- out: the scheduler collects each step's events per request in ``Deliveries`` and, after
  the step, hands them to each caller's event loop with one ``call_soon_threadsafe`` per
  loop. ``RequestHandle`` is the caller's end: it queues what arrives and yields it.

Nothing here blocks an event loop, and the scheduler never waits for a caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from pcrt.runtime.engine.grammar_compiler import Compiled
from pcrt.runtime.engine.requests import (
    CheckpointEvent,
    Completion,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
)

__all__ = [
    "Call",
    "Cancel",
    "Close",
    "Deliveries",
    "Embed",
    "EmbeddingJob",
    "Inbox",
    "Message",
    "Outgoing",
    "RequestHandle",
    "Submit",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

Outgoing: TypeAlias = TokenEvent | CheckpointEvent | FinishEvent | Completion | BaseException
"""What travels to a handle: its events, then its Completion or the error that ended it."""


class RequestHandle:
    """The caller's side of a request: iterate it for events, then read ``result``."""

    def __init__(self, inbox: Inbox, request: GenerateRequest, prompt: list[int]) -> None:
        self.id = request.id
        self.request = request
        self.t_submitted = time.perf_counter()  # queue wait counts in time to first token
        self.prompt_tokens = prompt
        self.cached_tokens = 0  # set by the scheduler when it admits the request
        # its compiled grammar, pinned at submit (``Engine.submit``); the scheduler copies it
        self.grammar: Compiled | None = None
        self.grammar_seconds: float | None = None  # what that grammar's compile took
        self.result: Completion | None = None
        self._inbox = inbox
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[list[Outgoing]] = asyncio.Queue()
        self._pending: deque[Outgoing] = deque()
        self._done = False

    def _deliver(self, items: list[Outgoing]) -> None:
        """Called on the event loop (via call_soon_threadsafe) with one step's events."""
        self._events.put_nowait(items)

    def cancel(self) -> None:
        if not self._done:
            self._inbox.put(Cancel(self.id))

    async def __aiter__(self) -> AsyncIterator[TokenEvent | CheckpointEvent | FinishEvent]:
        """Events in order. Leaving the loop early cancels the request.

        Undelivered events stay in the handle (not in this generator), so a second
        iteration, or ``completion()``, picks up where an earlier one stopped.
        """
        try:
            while True:
                if not self._pending:
                    if self._done:
                        return
                    self._pending.extend(await self._events.get())
                item = self._pending.popleft()
                if isinstance(item, Completion):
                    self.result = item
                    self._done = True
                elif isinstance(item, BaseException):
                    self._done = True
                    raise item
                else:
                    yield item
        finally:
            if not self._done:  # the consumer stopped early or was cancelled
                self.cancel()

    async def completion(self) -> Completion:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


# -- the inbox: what callers ask of the scheduler thread ------------------------------


@dataclass(frozen=True, slots=True)
class Submit:
    """Queue a request (already checked and tokenized by ``Engine.prepare``)."""

    handle: RequestHandle


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop a request, queued or running; its slots are free at the end of the step."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """Run ``fn`` on the scheduler thread between two steps; ``future`` gets its result."""

    fn: Callable[[], T]
    future: concurrent.futures.Future[T]

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn())
            except BaseException as exc:
                self.future.set_exception(exc)

    def fail(self, error: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)


class EmbeddingJob:
    """Tokenized texts to embed, one per scheduler step; ``future`` gets their vectors.

    The caller awaits ``future`` through ``asyncio.wrap_future``: a caller that is
    cancelled (its client left) cancels the future, and the scheduler, which looks before
    each text, drops the rest. The scheduler sets the future running only to finish it.
    """

    def __init__(self, inputs: list[list[int]]) -> None:
        self.inputs = inputs
        self.vectors: list[list[float]] = []
        self.future: concurrent.futures.Future[list[list[float]]] = concurrent.futures.Future()

    def succeed(self) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_result(self.vectors)

    def fail(self, error: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)


@dataclass(frozen=True, slots=True)
class Embed:
    """Queue an embedding job (already tokenized and checked by the engine)."""

    job: EmbeddingJob


@dataclass(frozen=True, slots=True)
class Close:
    """Fail what is pending and stop the scheduler thread."""


Message: TypeAlias = Submit | Cancel | Embed | Call[Any] | Close
Inbox: TypeAlias = queue.SimpleQueue[Message]


# -- the way out: events to each caller's event loop ----------------------------------


class Deliveries:
    """Events waiting to be handed to their callers' event loops after a step."""

    def __init__(self) -> None:
        self._outgoing: list[tuple[RequestHandle, list[Outgoing]]] = []

    def send(self, handle: RequestHandle, items: list[Outgoing]) -> None:
        """Queue events for one caller (copied: the scheduler reuses its lists)."""
        self._outgoing.append((handle, list(items)))

    def dispatch(self) -> None:
        """One wake-up per event loop per step, not one per request: on a 2-core machine
        every extra wake-up of the caller's thread takes CPU from llama.cpp's threads."""
        if not self._outgoing:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, list[Outgoing]]]] = {}
        for handle, items in self._outgoing:
            by_loop.setdefault(handle._loop, []).append((handle, items))
        self._outgoing = []
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, deliveries)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                log.debug("dropping events for %d requests: their loop is closed", len(deliveries))


def _deliver_all(deliveries: list[tuple[RequestHandle, list[Outgoing]]]) -> None:
    for handle, items in deliveries:
        handle._deliver(items)
