"""A worker thread never outlives the coroutine that started it, and the store closes
only between statements: the order that keeps a timeout or a shutdown from crashing the
process (a SQLite connection closed under a running statement is a segmentation fault)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from pcrt.cache.store import Store
from pcrt.runtime.threads import to_thread_to_completion


async def test_a_cancelled_caller_waits_for_its_thread_before_it_is_cancelled() -> None:
    release, started, finished = threading.Event(), threading.Event(), threading.Event()

    def write() -> str:
        started.set()
        release.wait(10)
        finished.set()
        return "written"

    caller = asyncio.ensure_future(to_thread_to_completion(write))
    await asyncio.to_thread(started.wait, 10)
    caller.cancel()
    await asyncio.sleep(0.2)
    assert not caller.done()  # the thread still runs, so the caller has not ended
    caller.cancel()  # a second cancellation does not cut the wait short either
    await asyncio.sleep(0.1)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished.is_set()


async def test_a_timeout_around_it_still_times_out_after_the_thread_ends() -> None:
    ended = threading.Event()

    def slow() -> None:
        threading.Event().wait(0.5)
        ended.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await to_thread_to_completion(slow)
    assert ended.is_set()


async def test_results_and_errors_pass_through() -> None:
    assert await to_thread_to_completion(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await to_thread_to_completion(lambda: 1 / 0)


def test_the_store_closes_only_between_statements(tmp_path: Path) -> None:
    """A thread inside a statement (holding the store's lock) delays ``close``; its next
    statement is a clean error, not a crash."""
    store = Store(tmp_path / "pcrt.db")
    inside, go_on, closed = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        with store.lock:
            inside.set()
            go_on.wait(10)
            store.db.execute("select 1")
        closed.wait(10)
        try:
            with store.lock:
                store.db.execute("select 1")
        except sqlite3.ProgrammingError as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    inside.wait(10)

    def close() -> None:
        store.close()
        closed.set()

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the statement in flight
    go_on.set()
    closer.join(10)
    thread.join(10)
    assert not closer.is_alive() and len(errors) == 1
