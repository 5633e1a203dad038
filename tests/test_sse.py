"""The one SSE parser: events split at blank lines (LF or CRLF) whatever the chunking."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pcrt.runtime.sse import DONE, SseEvent, SseSplitter, aevents, encode, events

STREAM = (
    b'event: node_started\ndata: {"node": "a"}\n\n'
    b'data: {"x": 1}\r\n\r\n'
    b": a comment line\ndata: line one\ndata: line two\n\n"
    b"data: [DONE]\n\n"
)


def _split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    got = list(events(_split_every(STREAM, size)))
    assert [(e.event, e.data) for e in got] == [
        ("node_started", b'{"node": "a"}'),
        ("message", b'{"x": 1}'),
        ("message", b"line one\nline two"),
        ("message", DONE),
    ]
    assert b"".join(e.raw for e in got) == STREAM  # a forward passes the bytes on unchanged
    assert [e.done for e in got] == [False, False, False, True]


def test_an_event_without_its_blank_line_ends_with_the_stream() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2\n") == [SseEvent(b"data: 1\n\n", "message", b"1")]
    assert splitter.close() == [SseEvent(b"data: 2\n", "message", b"2")]
    assert splitter.close() == []


def test_an_event_without_data_has_none() -> None:
    assert [e.data for e in events([b"event: ping\n\n"])] == [None]


async def test_async_chunks() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for piece in _split_every(STREAM, 5):
            yield piece

    got = [e.data async for e in aevents(chunks())]
    assert got[-1] == DONE and len(got) == 4


def test_encode_round_trips() -> None:
    text = encode('{"a": 1}', event="token") + encode("[DONE]")
    assert [(e.event, e.data) for e in events([text.encode()])] == [
        ("token", b'{"a": 1}'),
        ("message", DONE),
    ]
