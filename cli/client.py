"""The CLI's one HTTP client for a running daemon: where it is, whether it answers, its
JSON answers (errors as PcrtError, a refused DAG as DagInvalid) and its SSE streams.

Commands import this module inside their functions: httpx costs a tenth of a second
to import, which ``pcrt --help`` should not pay.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from pcrt.runtime.errors import DagInvalid, PcrtError, Problem
from pcrt.runtime.sse import SseEvent, events

__all__ = ["DaemonClient", "EventStream", "StreamResult"]


@dataclass
class StreamResult:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    t_start: float
    t_first: float | None
    t_done: float


@dataclass
class EventStream:
    """An SSE answer being read: its headers, and its events up to ``[DONE]``."""

    headers: Mapping[str, str]
    events: Iterator[SseEvent]


class DaemonClient:
    """``PCRT_URL`` (default http://127.0.0.1:11435) and ``PCRT_API_KEY``."""

    def __init__(self, url: str | None = None, api_key: str | None = None) -> None:
        self.url = (url or os.environ.get("PCRT_URL") or "http://127.0.0.1:11435").rstrip("/")
        key = api_key or os.environ.get("PCRT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=600.0)
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def is_up(self) -> bool:
        """True when a daemon answers /health with 200 within a fraction of a second."""
        try:
            return self.http.get("/health", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def asks_for_a_key(self) -> bool:
        """Whether the daemon refuses a caller without its API key (one was set)."""
        try:
            with httpx.Client(base_url=self.url, timeout=5) as bare:  # this client sends one
                return bare.get("/v1/models").status_code == 401
        except httpx.HTTPError:
            return False

    def get(self, path: str, *, headers: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, headers=headers)

    def post(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        return self.request("POST", path, body, headers=headers)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The JSON of the daemon's answer; an error answer raises (see ``_json``).
        ``headers``: added to this request (an agent's X-PC-Agent-ID)."""
        try:
            response = self.http.request(method, path, json=body, headers=headers)
        except httpx.ConnectError:
            raise PcrtError(
                f"no pcrt daemon answers at {self.url} (start one: pcrt serve)"
            ) from None
        except httpx.HTTPError as exc:
            raise PcrtError(f"the daemon at {self.url} failed: {exc}") from None
        return self._json(response)

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        """A 4xx/5xx becomes one line; one with a DAG's problems becomes DagInvalid."""
        try:
            data = response.json()
        except ValueError:
            raise PcrtError(f"the daemon answered {response.status_code} without JSON") from None
        if response.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            if error.get("problems"):
                raise DagInvalid([Problem(**p) for p in error["problems"]])
            raise PcrtError(f"daemon: {error.get('message') or response.status_code}")
        return data

    @contextlib.contextmanager
    def events(self, path: str, body: dict[str, Any]) -> Iterator[EventStream]:
        """POST ``body`` and read the answer as server-sent events (``pcrt.runtime.sse``).

        A broken connection while the events are read raises PcrtError here too.
        """
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._json(response)
                yield EventStream(response.headers, _until_done(response.iter_bytes()))
        except httpx.ConnectError:
            raise PcrtError(f"no pcrt daemon answers at {self.url}") from None
        except httpx.HTTPError as exc:
            raise PcrtError(f"the stream from {self.url} broke: {exc}") from None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[str | StreamResult]:
        """Stream a chat or text completion: yields text deltas, then one StreamResult."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        with self.events(path, body) as stream:
            for event in stream.events:
                chunk = json.loads(event.data or b"{}")
                if "error" in chunk:
                    raise PcrtError(f"daemon: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {}).get("content") or choice.get("text")
                    if delta:
                        first = first or time.perf_counter()
                        text.append(delta)
                        yield delta
                    finish = choice.get("finish_reason") or finish
        yield StreamResult("".join(text), finish, usage, start, first, time.perf_counter())


def _until_done(chunks: Iterator[bytes]) -> Iterator[SseEvent]:
    """The events that carry data, up to (not including) ``[DONE]``."""
    for event in events(chunks):
        if event.done:
            return
        if event.data:
            yield event
