"""Talking to a running daemon: where it is, whether it answers, and a streamed chat."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from pcrt.runtime.errors import PcrtError

__all__ = ["DaemonClient", "StreamResult"]


@dataclass
class StreamResult:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    t_start: float
    t_first: float | None
    t_done: float


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

    def get(self, path: str) -> Any:
        return self._json(self._call("GET", path))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._json(self._call("POST", path, json=body))

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise PcrtError(
                f"no pcrt daemon answers at {self.url} (start one: pcrt serve)"
            ) from None
        except httpx.HTTPError as exc:
            raise PcrtError(f"the daemon at {self.url} failed: {exc}") from None

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            data = response.json()
        except ValueError:
            raise PcrtError(f"the daemon answered {response.status_code} without JSON") from None
        if response.status_code >= 400:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise PcrtError(f"daemon: {message or response.status_code}")
        return data

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[str | StreamResult]:
        """Stream a chat or text completion: yields text deltas, then one StreamResult."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._json(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
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
        except httpx.ConnectError:
            raise PcrtError(f"no pcrt daemon answers at {self.url}") from None
        except httpx.HTTPError as exc:
            raise PcrtError(f"the stream from {self.url} broke: {exc}") from None
        yield StreamResult("".join(text), finish, usage, start, first, time.perf_counter())
