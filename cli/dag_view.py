"""``--follow``: the live progress view of a DAG run, fed by its events.

Local runs feed it the executor's events, the daemon's SSE stream feeds it the same
events as JSON, and a resumed daemon run feeds it events made up from polling its view.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from pcrt.cache.status import NodeStatus

if TYPE_CHECKING:
    from pcrt.runtime.dag.events import DagEvent

__all__ = ["FollowView", "NodeLookup"]

_TAIL = 400  # characters of streamed text kept per stream for the live view

NodeLookup = Callable[[str, str], dict[str, Any] | None]
"""(run id, node id) -> the node's record as a dict (the ``nodes`` items of a run view)."""


class FollowView:
    """``--follow``: a line when a node starts and when it finishes (tokens, time, cache
    hit, checkpoint), and the text being generated: on a terminal a live view of every
    stream, elsewhere one stream at a time printed inline, so logs stay readable."""

    def __init__(self, console: Console, lookup: NodeLookup, enabled: bool = True) -> None:
        self.console = console
        self.lookup = lookup
        self.enabled = enabled
        self.live: Live | None = None
        self.started: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.tails: dict[tuple[str, int], str] = {}
        self.inline: tuple[str, int] | None = None
        self.refreshed = 0.0

    def __enter__(self) -> FollowView:
        if self.enabled and self.console.is_terminal:
            self.live = Live(
                console=self.console,
                auto_refresh=False,
                transient=True,
                get_renderable=self._render,
            )
            self.live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end_inline()
        if self.live is not None:
            self.live.stop()
            self.live = None

    def local_event(self, event: DagEvent) -> None:
        self.event(event.kind, event.run_id, event.node, event.data)

    def event(self, kind: str, run_id: str, node: str | None, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if kind == "token" and node is not None:
            self._token(node, int(data.get("index") or 0), str(data.get("text") or ""))
        elif kind == "run_started":
            verb = "resumed" if data.get("resumed") else "started"
            self._line(Text.assemble(("run ", "bold"), (run_id, "bold"), f" {verb}"))
        elif kind == "node_started" and node is not None:
            self.started[node] = time.perf_counter()
            self.counts[node] = 0
            kind_text = f" ({data['type']})" if data.get("type") else ""
            self._line(Text.assemble(("→ ", "cyan"), (node, "bold"), kind_text))
        elif kind == "checkpoint" and node is not None:
            self._line(Text(f"  {node}: checkpoint at {data.get('tokens')} tokens", style="dim"))
        elif kind == "tool_calls" and node is not None:
            calls = ", ".join(
                f"{c.get('tool')}{'' if c.get('ok') else ' (failed)'}"
                for c in data.get("calls", [])
            )
            self._line(Text(f"  {node}: step {data.get('step')} called {calls}", style="dim"))
        elif kind == "node_finished" and node is not None:
            self._finished(run_id, node, data)

    def _finished(self, run_id: str, node: str, data: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.started.pop(node, time.perf_counter())
        counted = self.counts.pop(node, 0)
        for key in [k for k in self.tails if k[0] == node]:
            del self.tails[key]
        if self.inline is not None and self.inline[0] == node:
            self._end_inline()
        if data.get("status") == NodeStatus.FAILED:
            self._line(
                Text.assemble(("✗ ", "red"), (node, "bold"), f" failed: {data.get('error')}")
            )
            return
        record = self.lookup(run_id, node) or {}
        tokens = record.get("completion_tokens")
        seconds = record.get("seconds")
        facts = [f"{elapsed if seconds is None else seconds:.2f} s"]
        if record.get("type") != "assert":
            facts.insert(0, f"{counted if tokens is None else tokens} tokens")
        if record.get("prompt_tokens"):
            facts.append(
                f"prompt {record['prompt_tokens']} ({record.get('cached_tokens') or 0} reused)"
            )
        if record.get("cache_hit"):
            facts.append("cache hit")
        if record.get("resumed_from_checkpoint"):
            facts.append("resumed from checkpoint")
        self._line(Text.assemble(("✓ ", "green"), (node, "bold"), ("  " + ", ".join(facts), "dim")))

    def _token(self, node: str, index: int, text: str) -> None:
        self.counts[node] = self.counts.get(node, 0) + 1
        key = (node, index)
        if self.live is not None:
            self.tails[key] = (self.tails.get(key, "") + text)[-_TAIL:]
            now = time.perf_counter()
            if now - self.refreshed > 0.08:
                self.refreshed = now
                self.live.refresh()
            return
        if self.inline is None:
            self.inline = key
            label = node if index == 0 else f"{node}[{index}]"
            self._write(f"  {label}> ")
        if self.inline == key:
            self._write(text.replace("\n", "\n    "))

    def _line(self, text: Text) -> None:
        self._end_inline()
        if self.live is not None:
            self.live.refresh()  # the live area printed below the line shows the news
        self.console.print(text, highlight=False)

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    def _end_inline(self) -> None:
        if self.inline is not None:
            self._write("\n")
            self.inline = None

    def _render(self) -> RenderableType:
        now = time.perf_counter()
        width = self.console.width
        lines: list[Text] = []
        for node, started in self.started.items():
            head = f" {self.counts.get(node, 0)} tok {now - started:.1f}s "
            streams = sorted(k for k in self.tails if k[0] == node)
            if not streams:
                lines.append(
                    Text.assemble(("… ", "yellow"), (node, "bold"), (head + "prefill", "dim"))
                )
            for key in streams:
                label = node if len(streams) == 1 else f"{node}[{key[1]}]"
                room = max(10, width - len(label) - len(head) - 3)
                tail = " ".join(self.tails[key].split())[-room:]
                lines.append(
                    Text.assemble(
                        ("… ", "yellow"),
                        (label, "bold"),
                        (head, "dim"),
                        tail,
                        no_wrap=True,
                        overflow="ellipsis",
                    )
                )
        return Group(*lines)
