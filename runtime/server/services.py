"""What the routes share: the pool, the store, limits, metrics; per-request accounting.

Accounting runs on the event loop, in sync code (a stream's last chunk, an error's
handler): its usage rows are queued (``UsageLog.record_soon``) for the log's writer
thread, never written in place, where SQLite could hold the loop for as long as another
connection's commit takes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from fastapi import Request

from pcrt.cache.async_runs import AsyncResponses
from pcrt.cache.blobs import BlobStore
from pcrt.cache.chunks import ChunkStore
from pcrt.cache.usage import UsageLog, UsageRecord
from pcrt.device.monitor import DeviceMonitor
from pcrt.routing.coordinator import Coordinator
from pcrt.routing.forward import AGENT_HEADER
from pcrt.routing.peers import reported_count
from pcrt.runtime.dag.tasks import DagTasks
from pcrt.runtime.engine import Completion
from pcrt.runtime.errors import PcrtError
from pcrt.runtime.server.http_errors import status_and_body
from pcrt.runtime.server.limits import RateLimiter
from pcrt.runtime.server.metrics import Metrics
from pcrt.runtime.server.node_info import NodeInfo
from pcrt.runtime.server.pool import ModelPool
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.tools import CallObserver, ToolRegistry

__all__ = [
    "Accounting",
    "DaemonState",
    "Services",
    "agent_of",
    "dag_billing",
    "services_of",
    "tool_accounting",
]

log = logging.getLogger(__name__)


class DaemonState(StrEnum):
    """Where the daemon is in its life: ``/health`` answers 200 only while serving."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"  # no new requests; running ones finish, DAG runs may move


@dataclass
class Services:
    """Built and closed by ``lifespan.running_services``; routes reach it via app.state.

    Set once at construction, but for two fields: ``state`` moves on with the daemon's
    life (a drain begins from a signal handler, ``cli/serve.py``), and ``begin_drain`` is
    set by the lifespan once the drain exists (the drain is built from these services).
    """

    settings: ServerSettings
    pool: ModelPool
    usage: UsageLog
    limiter: RateLimiter
    metrics: Metrics
    monitor: DeviceMonitor
    blobs: BlobStore  # KV state blobs under the home dir
    dags: DagTasks  # running DAG executions
    coordinator: Coordinator  # peers: discovery, health, routing decisions
    node: NodeInfo  # what this node offers, for peers and the policy
    tools: ToolRegistry  # the [tools] agents call (entered: MCP sessions are open)
    responses: AsyncResponses  # the Responses API's stored responses (store: true)
    chunks: ChunkStore | None = None  # the KV chunk store engines share (None: turned off)
    state: str = DaemonState.STARTING
    # begins the drain from a signal handler, thread-safe (cli/serve.py)
    begin_drain: Callable[[], object] | None = None


def agent_of(request: Request, user: str | None = None) -> str:
    """Whom a request works for: its X-PC-Agent-ID, else the OpenAI ``user`` field."""
    return request.headers.get(AGENT_HEADER) or user or "anonymous"


def dag_billing(
    usage: UsageLog, limiter: RateLimiter, metrics: Metrics
) -> Callable[[UsageRecord], None]:
    """What the DAG runner does with each generation's usage row: what ``Accounting``
    does with a request's (the row, the agent's token bucket, the counters)."""

    def bill(record: UsageRecord) -> None:
        metrics.requests.labels(record.route, record.model, str(record.status)).inc()
        metrics.prompt_tokens.labels(record.model).inc(record.prompt_tokens)
        metrics.cached_tokens.labels(record.model).inc(record.cached_tokens)
        metrics.completion_tokens.labels(record.model).inc(record.completion_tokens)
        limiter.charge(record.agent, record.completion_tokens)
        usage.record_soon(record)

    return bill


# a tool call's outcome as a usage row's status, as HTTP would say it
_CALL_STATUS = {"ok": 200, "error": 502, "timeout": 504, "denied": 403, "invalid": 400}


def tool_accounting(usage: UsageLog, metrics: Metrics) -> CallObserver:
    """What the tool registry does with each call: the counters, and a usage row billed
    to the calling agent (``pcrt usage`` shows tool calls as ``tool:NAME``)."""

    def observe(tool: str, outcome: str, seconds: float, agent: str | None) -> None:
        metrics.tool_call(tool, outcome, seconds)
        row = UsageRecord(
            agent=agent or "daemon",
            model=f"tool:{tool}",
            route="/tools",
            status=_CALL_STATUS.get(outcome, 500),
            total_ms=seconds * 1000,
        )
        usage.record_soon(row)

    return observe


def services_of(request: Request) -> Services:
    """The app's services, which its lifespan put on ``app.state``."""
    services: Services = request.app.state.services
    return services


@dataclass
class Accounting:
    """One request's usage row, metrics and rate-limit charges, written exactly once."""

    services: Services
    agent: str
    model: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    # peers that failed this request before whoever served it (their names and errors)
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    _done: bool = False
    _admitted: bool = False

    def fell_back(self, node: str, error: str) -> None:
        """A peer failed before answering; the next candidate takes the request."""
        self.fallbacks.append({"node": node, "error": error})
        self.services.metrics.peer_fallbacks.labels(node).inc()

    def admit(self, prompt_tokens: int) -> None:
        """Charged once per request, even when a forward falls back to local."""
        if self._admitted:
            return
        self.services.limiter.admit(self.agent, prompt_tokens)
        self._admitted = True

    def failed(self, exc: PcrtError) -> None:
        status, _, _ = status_and_body(exc)
        self._write(status, None)

    def finished(self, result: Completion | None, status: int) -> None:
        self._write(status, result)

    def finished_remote(
        self, status: int, usage: dict[str, Any] | None, ttft: float | None, ran_on: str
    ) -> None:
        """A request a peer served: its own usage counts, and where it ran."""
        if self._done:
            return
        self._done = True
        usage = usage if isinstance(usage, dict) else {}
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        prompt, completion = (
            reported_count(usage.get("prompt_tokens")),
            reported_count(usage.get("completion_tokens")),
        )
        m = self.services.metrics
        m.requests.labels(self.route, self.model, str(status)).inc()
        m.prompt_tokens.labels(self.model).inc(prompt)
        m.completion_tokens.labels(self.model).inc(completion)
        if status == 200:
            self.services.limiter.charge(self.agent, completion)
        self._record(
            UsageRecord(
                self.agent,
                self.model,
                self.route,
                status,
                prompt_tokens=prompt,
                cached_tokens=reported_count(details.get("cached_tokens")),
                completion_tokens=completion,
                ttft_ms=None if ttft is None else ttft * 1000,
                total_ms=self._elapsed_ms(),
                ran_on=ran_on,
            )
        )

    def finished_embeddings(self, tokens: int) -> None:
        if self._done:
            return
        self._done = True
        m = self.services.metrics
        m.requests.labels(self.route, self.model, "200").inc()
        m.prompt_tokens.labels(self.model).inc(tokens)
        self._record(
            UsageRecord(
                self.agent,
                self.model,
                self.route,
                200,
                prompt_tokens=tokens,
                total_ms=self._elapsed_ms(),
            )
        )

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def _write(self, status: int, result: Completion | None) -> None:
        if self._done:
            return
        self._done = True
        m = self.services.metrics
        m.requests.labels(self.route, self.model, str(status)).inc()
        record = UsageRecord(
            self.agent, self.model, self.route, status, total_ms=self._elapsed_ms()
        )
        if result is not None:
            ttft = (
                result.t_first_token - result.t_submitted
                if result.t_first_token is not None
                else None
            )
            record = UsageRecord(
                self.agent,
                self.model,
                self.route,
                status,
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                completion_tokens=result.completion_tokens,
                ttft_ms=None if ttft is None else ttft * 1000,
                total_ms=self._elapsed_ms(),
                request_id=result.id,
            )
            m.prompt_tokens.labels(self.model).inc(result.prompt_tokens)
            m.cached_tokens.labels(self.model).inc(result.cached_tokens)
            m.completion_tokens.labels(self.model).inc(result.completion_tokens)
            if ttft is not None:
                m.ttft.labels(self.model).observe(ttft)
            if result.completion_tokens > 1 and result.t_first_token is not None:
                per_token = (result.t_done - result.t_first_token) / (result.completion_tokens - 1)
                m.per_token.labels(self.model).observe(per_token)
            self.services.limiter.charge(self.agent, result.completion_tokens)
        self._record(record)

    def _record(self, record: UsageRecord) -> None:
        if self.fallbacks:
            record = replace(record, fallbacks=json.dumps(self.fallbacks))
        try:
            self.services.usage.record_soon(record)
        except Exception:  # accounting must never fail the request it accounts for
            log.exception("could not write a usage row")
