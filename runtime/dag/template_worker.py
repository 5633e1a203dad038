"""DAG templates run in a process of their own, with a memory limit and a deadline.

A DAG's templates are untrusted code from whoever sent the DAG. The sandbox stops them
reaching Python's internals, but not from spending: nested loops, recursive macros,
filters over big sequences (``(['x' * 100000] * 100000) | join`` is 10 GB) and string
growth compound in ways no per-operation check bounds. Run on the daemon's event loop,
one such template stalled every request for minutes or could exhaust the machine's
memory. Here it costs at most ``DEADLINE`` seconds and ``MEMORY_LIMIT`` bytes of a child
process, which is killed and replaced when it overruns; the daemon answers on.

The parent (``TemplateWorker``, here) and the child (``template_child``) speak one JSON
object per line: requests carry the template and the scope (JSON: inputs and node
outputs), replies the result or the reason it failed. JSON, not pickle: a child that ran
hostile code must not be able to hand the daemon anything but data.

The child serves one request at a time. The event loop's requests (``call_async``) wait
their turn in a queue served by one thread of the worker's own: waiting never blocks the
loop, and a run with 32 nodes in flight never ties up more than that thread (the loop's
default executor stays free for the store's writes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

__all__ = ["DEADLINE", "MAX_RESULT", "MEMORY_LIMIT", "TemplateWorker", "jsonable"]

log = logging.getLogger(__name__)

MEMORY_LIMIT = 1 << 30  # address space of the child
DEADLINE = 2.0  # seconds for one render, from the parent's side (the child's meter says 1)
MAX_RESULT = 16 << 20  # bytes of one reply: a prompt past this fits no context anyway


class TemplateWorker:
    """The parent's end: one child, started on first use, replaced after a failure.
    Thread-safe (one request at a time)."""

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request at a time
        self._serving: object | None = None  # the ticket of the request the child has
        self._serving_lock = threading.Lock()  # the pair (_serving, _child), briefly
        self._queue: ThreadPoolExecutor | None = None  # the event loop's requests
        self._queue_lock = threading.Lock()

    def call(self, request: dict[str, Any], ticket: object | None = None) -> dict[str, Any]:
        """The child's reply to ``request``: ``{"ok": ...}``, or ``{"error": reason}``.
        Blocks for up to ``DEADLINE`` seconds, and while other requests go first."""
        line = json.dumps(request, default=jsonable).encode() + b"\n"
        with self._lock:
            child = self._started()
            assert child.stdin is not None and child.stdout is not None
            with self._serving_lock:
                self._serving = ticket
            try:
                child.stdin.write(line)
                child.stdin.flush()
                reply = _read_line(child.stdout, DEADLINE)
            except OSError:  # the child died while we wrote
                reply = b""
            finally:
                with self._serving_lock:
                    self._serving = None
            if reply is None:
                self._stop()
                return {"error": f"SecurityError: the template took over {DEADLINE:g} s"}
            if not reply:
                self._stop()
                return {
                    "error": "SecurityError: the template used more than "
                    f"{MEMORY_LIMIT >> 20} MiB of memory"
                }
        answer: dict[str, Any] = json.loads(reply)
        return answer

    async def call_async(self, request: dict[str, Any]) -> dict[str, Any]:
        """``call`` for the event loop: queued for the worker's thread, in arrival order.

        A cancelled caller (a run's timeout, a shutdown) drops its request if it has not
        started; if the child is on it, the child is killed (its render is abandoned) and
        the caller returns once the thread has let go, so no thread outlives its caller."""
        ticket = object()
        job = self._thread().submit(self.call, request, ticket)
        try:
            return await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            if not job.cancel():
                self._interrupt(ticket)
                await _ended(job)
            raise

    @property
    def running(self) -> bool:
        """Whether the child is up (it starts on the first template that needs it)."""
        return self._child is not None and self._child.poll() is None

    def close(self) -> None:
        with self._queue_lock:
            queue, self._queue = self._queue, None
        if queue is not None:
            queue.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._stop()

    def _thread(self) -> ThreadPoolExecutor:
        with self._queue_lock:
            if self._queue is None:
                self._queue = ThreadPoolExecutor(1, thread_name_prefix="pcrt-templates")
            return self._queue

    def _interrupt(self, ticket: object) -> None:
        """Kill the child if it is serving ``ticket``'s request: its thread then reads
        end-of-file at once, and the next request starts a new child."""
        with self._serving_lock:
            if self._serving is ticket and self._child is not None:
                self._child.kill()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            child = subprocess.Popen(
                [sys.executable, "-m", "pcrt.runtime.dag.template_child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            with self._serving_lock:
                self._child = child
        assert self._child is not None
        return self._child

    def _stop(self) -> None:
        with self._serving_lock:
            child, self._child = self._child, None
        if child is None:
            return
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


async def _ended(job: Future[Any]) -> None:
    """Wait for a job that has started, whatever cancels the wait meanwhile."""
    while not job.done():
        try:
            await asyncio.wait([asyncio.wrap_future(job)])
        except asyncio.CancelledError:
            continue  # cancelled again: the thread still has to let go first


def _read_line(stream: IO[bytes], timeout: float) -> bytes | None:
    """One line, b"" when the child is gone, None when it said nothing in ``timeout``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        return None
    return stream.readline()


def jsonable(value: Any) -> Any:
    """Sets, ranges and other iterables a template may produce, as lists."""
    if isinstance(value, str | bytes):
        raise TypeError(f"{type(value).__name__} is not JSON")
    try:
        return list(value)
    except TypeError:
        kind = type(value).__name__
        raise TypeError(f"a value of type {kind} cannot leave the sandbox") from None
