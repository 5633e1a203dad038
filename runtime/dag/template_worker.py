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
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
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
        self._lock = threading.Lock()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """The child's reply to ``request``: ``{"ok": ...}``, or ``{"error": reason}``."""
        line = json.dumps(request, default=jsonable).encode() + b"\n"
        with self._lock:
            child = self._started()
            assert child.stdin is not None and child.stdout is not None
            try:
                child.stdin.write(line)
                child.stdin.flush()
                reply = _read_line(child.stdout, DEADLINE)
            except OSError:  # the child died while we wrote
                reply = b""
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

    @property
    def running(self) -> bool:
        """Whether the child is up (it starts on the first template that needs it)."""
        return self._child is not None and self._child.poll() is None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "pcrt.runtime.dag.template_child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self._child

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


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
