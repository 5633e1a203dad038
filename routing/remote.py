"""DAG work on peers: what the executor calls when the policy picks a peer.

- To a vLLM or other OpenAI-compatible peer, a node's generation is one streamed
  ``/v1/chat/completions`` call (``stream_options.include_usage`` for the token counts).
  An output schema goes as ``response_format: json_schema``, OpenAI's form; a server that
  refuses that form (llama-cpp-python's takes ``json_object`` with a ``schema``) is asked
  again in the other form, and the form that worked is remembered per peer.
- To a pcrt peer, a subgraph goes whole to ``POST /v1/pcrt/subgraphs``: its nodes, the
  run's inputs and the outputs it needs from upstream; the peer runs it and answers with
  the node records, proven with the cluster key over our request and those very bytes
  (``auth.response_proof``): an answer without the proof, or changed on the way, is the
  peer's failure and the next candidate takes the work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pcrt.routing.coordinator import Coordinator
from pcrt.routing.forward import AGENT_HEADER, sse_events
from pcrt.routing.peers import Peer, reported_count
from pcrt.routing.policy import Candidate, Decision, Work
from pcrt.runtime.errors import PeerError, PeerRejected, PeerUnavailable

__all__ = ["RemoteGeneration", "RemoteRunner", "SUBGRAPH_PATH"]

SUBGRAPH_PATH = "/v1/pcrt/subgraphs"


@dataclass(frozen=True)
class RemoteGeneration:
    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    seconds: float


class RemoteRunner:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._schema_form: dict[str, str] = {}  # peer name -> "json_schema" | "json_object"

    @property
    def enabled(self) -> bool:
        return self.coordinator.enabled

    def decide(self, work: Work) -> Decision:
        return self.coordinator.decide(work)

    def known_names(self) -> tuple[set[str], set[str]]:
        return self.coordinator.remote_names()

    def known_tools(self) -> set[str]:
        return self.coordinator.remote_tools()

    def failed(self, exc: PeerError) -> None:
        self.coordinator.report_failure(exc)

    def _peer(self, candidate: Candidate) -> Peer:
        peer = self.coordinator.peer(candidate.node)
        if peer is None:
            raise PeerUnavailable(f"peer {candidate.node} left the table", peer=candidate.node)
        return peer

    async def chat(
        self,
        candidate: Candidate,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        on_text: Callable[[int, str], None],
    ) -> RemoteGeneration:
        """One streamed chat completion on an OpenAI-compatible peer."""
        peer = self._peer(candidate)
        forms = ["json_schema", "json_object"]
        if self._schema_form.get(peer.name) == "json_object":
            forms.reverse()
        last: PeerError | None = None
        for form in forms if schema is not None else ["none"]:
            body: dict[str, Any] = {
                **params,
                "model": candidate.model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if form == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    # not strict: OpenAI's strict mode refuses most schemas as written
                    "json_schema": {"name": "output", "schema": schema},
                }
            elif form == "json_object":
                body["response_format"] = {"type": "json_object", "schema": schema}
            try:
                forwarder = self.coordinator.forwarder
                result = await forwarder.until_lost(peer, self._stream_chat(peer, body, on_text))
            except PeerError as exc:
                if schema is None or not _refused_the_form(exc):
                    raise
                last = exc  # maybe the other schema form
                continue
            if schema is not None:
                self._schema_form[peer.name] = form
            return result
        assert last is not None
        raise last

    async def _stream_chat(
        self, peer: Peer, body: dict[str, Any], on_text: Callable[[int, str], None]
    ) -> RemoteGeneration:
        started = time.perf_counter()
        stream = await self.coordinator.forwarder.open_stream(peer, "/v1/chat/completions", body)
        texts: dict[int, str] = {}
        usage: dict[str, Any] = {}
        chunks = 0  # servers without include_usage (llama-cpp-python's): one token each
        try:
            async for _, data in sse_events(aiter(stream)):
                if data is None or data == b"[DONE]":
                    continue
                event = json.loads(data)
                if isinstance(event.get("error"), dict):
                    message = event["error"].get("message", "an error")
                    raise PeerUnavailable(f"peer {peer.name}: {message}", peer=peer.name)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        index = int(choice.get("index", 0))
                        texts[index] = texts.get(index, "") + piece
                        chunks += 1
                        on_text(index, piece)
        except (ValueError, TypeError, AttributeError) as exc:
            raise PeerUnavailable(
                f"peer {peer.name} sent a malformed stream: {exc}", peer=peer.name
            ) from None
        except PeerError:
            raise
        except Exception as exc:  # the connection broke mid-stream
            raise PeerUnavailable(
                f"peer {peer.name} failed mid-stream: {type(exc).__name__}: {exc}", peer=peer.name
            ) from None
        finally:
            await stream.aclose()
        n = max(texts) + 1 if texts else 1
        usage = usage if isinstance(usage, dict) else {}
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        return RemoteGeneration(
            texts=[texts.get(i, "") for i in range(n)],
            prompt_tokens=reported_count(usage.get("prompt_tokens")),
            completion_tokens=reported_count(usage.get("completion_tokens")) or chunks,
            cached_tokens=reported_count(details.get("cached_tokens")),
            seconds=time.perf_counter() - started,
        )

    async def subgraph(
        self,
        candidate: Candidate,
        payload: dict[str, Any],
        timeout: float | None,
        agent: str | None = None,
    ) -> dict[str, Any]:
        """Run a subgraph on a pcrt peer; its answer: status, error and node records. The
        peer bills its generations to ``agent``, as a forwarded request's are."""
        peer = self._peer(candidate)
        payload = {**payload, "origin": self.coordinator.node_name}  # where upstream ran
        forwarder = self.coordinator.forwarder
        # the whole subgraph runs before the answer, which is the first byte back: read for
        # the DAG's own timeout (and a margin), or the forwarder's usual read limit (600 s
        # by default) when the DAG has none, so a peer that took the call and then went
        # silent while passing its health checks cannot hold it forever; connecting stays
        # quick
        limit = forwarder.timeout.sock_read if timeout is None else timeout + 30
        reading = forwarder.timeout_reading(limit)
        answer = await forwarder.until_lost(
            peer,
            forwarder.request(
                peer,
                "POST",
                SUBGRAPH_PATH,
                json_body=payload,
                timeout=reading,
                headers={AGENT_HEADER: agent} if agent else None,
                proven=True,  # outputs become our run's: only a member's, unchanged
            ),
        )
        try:
            result = answer.json()
        except ValueError:
            result = None
        if not isinstance(result, dict) or not isinstance(result.get("nodes"), dict):
            raise PeerUnavailable(f"peer {peer.name} answered a malformed result", peer=peer.name)
        return result


def _refused_the_form(exc: PeerError) -> bool:
    """Whether the peer refused our ``response_format`` (llama-cpp-python's server answers
    a 500 for what is a validation error)."""
    if isinstance(exc, PeerRejected):
        return exc.status in (400, 422)
    return "response_format" in str(exc)
