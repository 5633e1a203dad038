"""Server-sent events: the one parser (and the one encoder) of the project.

The daemon streams completions and DAG runs as SSE; the peer client reads a peer's stream
(and may pass it on byte for byte), the CLI reads the daemon's. All of them split events
here. An event ends at a blank line, in LF or CRLF form (sse-starlette writes CRLF);
events may span the chunks a transport hands over.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

__all__ = ["DONE", "SseEvent", "SseSplitter", "aevents", "encode", "events"]

DONE = b"[DONE]"  # OpenAI's last data line: the stream ends after it


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the event as it came, its blank line included: a forward passes it on
    event: str  # its ``event:`` field; "message" when it has none
    data: bytes | None  # its ``data:`` lines joined by newlines; None when it has none

    @property
    def done(self) -> bool:
        return self.data == DONE


class SseSplitter:
    """Feed chunks in, take whole events out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        found: list[SseEvent] = []
        while True:
            end, size = _event_end(self._buffer)
            if end < 0:
                return found
            raw, self._buffer = self._buffer[: end + size], self._buffer[end + size :]
            found.append(_parse(raw))

    def close(self) -> list[SseEvent]:
        """The last event when the stream ended without its blank line."""
        raw, self._buffer = self._buffer, b""
        return [_parse(raw)] if raw.strip() else []


def events(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    splitter = SseSplitter()
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.close()


async def aevents(chunks: AsyncIterable[bytes]) -> AsyncIterator[SseEvent]:
    splitter = SseSplitter()
    async for chunk in chunks:
        for event in splitter.feed(chunk):
            yield event
    for event in splitter.close():
        yield event


def encode(data: str, event: str | None = None) -> str:
    """One event as the daemon writes it (``data`` is one line: JSON, or ``[DONE]``)."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {data}\n\n"


def _parse(raw: bytes) -> SseEvent:
    kind = "message"
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip())
        elif line.startswith(b"event:"):
            kind = line[6:].strip().decode("utf-8", "replace")
    return SseEvent(raw, kind, b"\n".join(data) if data else None)


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first event ends, and the length of its blank line; (-1, 0) if not yet."""
    ends = [(buffer.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n")]
    found = [(i, n) for i, n in ends if i >= 0]
    return min(found) if found else (-1, 0)
