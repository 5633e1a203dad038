"""OpenAI chat chunks as the Responses API's typed events and Response object (pure: no
I/O, no model).

``ResponseEvents`` is fed the chunks of one generation in order and returns the events
each gives, numbered (``sequence_number``) from ``response.created`` on; it keeps the
whole Response as it grows, which ``response.completed`` (or ``response.incomplete``, at
``max_output_tokens``) carries, and which a request that does not stream is answered
with. Text opens a ``message`` item (its one ``output_text`` part); each tool call a
``function_call`` item; an item is done when the next begins or the answer ends, so the
events nest as OpenAI's do: added, deltas, done.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from pcrt.runtime.server.schemas.responses import ResponsesRequest
from pcrt.runtime.server.serving.chat_stream import delta_of

__all__ = ["ResponseEvents", "new_id", "response_shell", "responses_usage"]

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``resp_``, ``msg_``, ``fc_``): unguessable, as a stored
    response is read by its id alone."""
    return f"{prefix}_{uuid.uuid4().hex}"


def response_shell(body: ResponsesRequest, response_id: str, created_at: int) -> dict[str, Any]:
    """The Response object before any output: what it echoes of its request."""
    fmt = body.text.format if body.text else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": None,
        "store": body.store,
        "temperature": body.temperature,
        "text": {
            "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        },
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "metadata": body.metadata or {},
    }


def responses_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Chat usage (``prompt_tokens``...) as the Responses API counts it."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": int(details.get("cached_tokens") or 0),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},  # pcrt's models answer only
        "total_tokens": prompt + completion,
    }


class ResponseEvents:
    """One Response as it is generated: the events each chunk gives, and the whole."""

    def __init__(self, shell: Mapping[str, Any]) -> None:
        self.response: dict[str, Any] = {**shell, "output": []}
        self._sequence = 0
        self._open: int | None = None  # the output index of the item not yet done
        self._calls: dict[int, int] = {}  # a chat tool call's index -> its output index
        self._finish_reason: str | None = None

    @property
    def output(self) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = self.response["output"]
        return output

    def started(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``."""
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        """The events of one chat chunk (none for the role chunk, nor the usage one)."""
        if isinstance(chunk.get("usage"), dict):
            self.response["usage"] = responses_usage(chunk["usage"])
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.response["model"] = chunk["model"]  # the model as loaded (an alias resolved)
        events: list[Event] = []
        delta = delta_of(chunk)
        if delta is None:
            return events
        if delta.text:
            events += self._text(delta.text)
        for call in delta.calls:
            events += self._call(call)
        if delta.finish_reason:
            self._finish_reason = delta.finish_reason
        return events

    def finished(self) -> list[Event]:
        """The item still open closed, and ``response.completed``, or
        ``response.incomplete`` when the answer was cut at ``max_output_tokens``."""
        cut = self._finish_reason == "length"
        events = self._close("incomplete" if cut else "completed")
        if self.response["usage"] is None:
            self.response["usage"] = responses_usage({})
        self.response["completed_at"] = int(time.time())
        if cut:
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            return [*events, self._event("response.incomplete", response=self._snapshot())]
        self.response["status"] = "completed"
        return [*events, self._event("response.completed", response=self._snapshot())]

    def failed(self, message: str, code: str | None = None) -> list[Event]:
        """The generation failed mid-way: an ``error`` event, then ``response.failed``."""
        self.response["status"] = "failed"
        self.response["error"] = {"code": code or "server_error", "message": message}
        return [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self._snapshot()),
        ]

    # -- items --------------------------------------------------------------------------

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self.output[self._open]["type"] != "message":
            events += self._close("completed")
            events += self._open_message()
        assert self._open is not None
        item = self.output[self._open]
        item["content"][0]["text"] += text
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self._open,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _open_message(self) -> list[Event]:
        item: dict[str, Any] = {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        index = self._add(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        return [
            self._event("response.output_item.added", output_index=index, item=_bare(item)),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=dict(part),
            ),
        ]

    def _call(self, delta: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        chat_index = int(delta.get("index", len(self._calls)))
        function = delta.get("function") or {}
        if chat_index not in self._calls:
            events += self._close("completed")
            item: dict[str, Any] = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": str(delta.get("id") or new_id("call")),
                "name": str(function.get("name") or ""),
                "arguments": "",
            }
            added = self._calls[chat_index] = self._add(item)
            events.append(
                self._event("response.output_item.added", output_index=added, item=dict(item))
            )
        index = self._calls[chat_index]
        fragment = str(function.get("arguments") or "")
        if fragment:
            item = self.output[index]
            item["arguments"] += fragment
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=fragment,
                )
            )
        return events

    def _add(self, item: dict[str, Any]) -> int:
        self.output.append(item)
        self._open = len(self.output) - 1
        return self._open

    def _close(self, status: str) -> list[Event]:
        """The open item's done events, with ``status``; none when no item is open."""
        if self._open is None:
            return []
        index, self._open = self._open, None
        item = self.output[index]
        item["status"] = status
        events: list[Event] = []
        if item["type"] == "message":
            part = item["content"][0]
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(
                self._event("response.output_text.done", **common, text=part["text"], logprobs=[])
            )
            events.append(self._event("response.content_part.done", **common, part=dict(part)))
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        events.append(
            self._event("response.output_item.done", output_index=index, item=_copy(item))
        )
        return events

    # -- framing ------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        """The Response as it stands (a copy: later events must not change an event's)."""
        return {**self.response, "output": [_copy(item) for item in self.output]}


def _copy(item: Mapping[str, Any]) -> dict[str, Any]:
    copied = dict(item)
    if "content" in copied:
        copied["content"] = [dict(part) for part in copied["content"]]
    return copied


def _bare(item: Mapping[str, Any]) -> dict[str, Any]:
    """A message item as ``output_item.added`` shows it: no content yet."""
    return {**item, "content": []}
