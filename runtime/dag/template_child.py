"""The template worker's child process: it renders what ``TemplateWorker`` sends it.

Started as ``python -m pcrt.runtime.dag.template_child`` with a memory limit; one JSON
request per line on stdin, one JSON reply per line on stdout (``template_worker``).
"""

from __future__ import annotations

import json
import resource
import signal
import sys

from pcrt.runtime.dag.template_render import serve_request
from pcrt.runtime.dag.template_worker import MAX_RESULT, MEMORY_LIMIT, jsonable
from pcrt.runtime.dag.templates import sandbox_here

__all__ = ["main"]


def main() -> None:
    """The child: serve requests from stdin until it closes."""
    # Ctrl-C at the terminal reaches the whole process group: the daemon stops us (or
    # our stdin closes when it dies); a traceback from here would only confuse
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    env = sandbox_here()
    for line in sys.stdin.buffer:
        try:
            reply = serve_request(env, json.loads(line))
            out = json.dumps(reply, default=jsonable)
        except MemoryError:
            out = json.dumps(
                {"error": f"SecurityError: the template needs over {MEMORY_LIMIT >> 20} MiB"}
            )
        except Exception as exc:  # a reply for every request, whatever went wrong
            out = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        if len(out) > MAX_RESULT:
            out = json.dumps(
                {"error": f"SecurityError: the template's result is over {MAX_RESULT >> 20} MB"}
            )
        sys.stdout.write(out + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
