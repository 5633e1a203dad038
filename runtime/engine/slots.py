"""A slot: one llama.cpp sequence of the engine's context, and the tokens it holds.

The engine has ``parallel`` slots, numbered 0.. like llama.cpp's sequence ids, each with
its own KV stream of ``context`` cells. A slot runs one request (or one branch of a fork)
at a time; when the request ends the slot keeps its tokens and their KV, so a later prompt
that starts the same way computes only the rest (``prefix`` decides which slot a prompt
goes to). ``tokens`` is the engine's record of what the KV holds, position by position:
every change to one goes with the same change to the other (``kv`` and ``scheduler``
keep them in step). Owned by the scheduler thread; other threads only read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Slot"]


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    busy: bool = False
    last_used: float = 0.0  # time.monotonic() when its last request ended (0: never used)
