"""DAG runs over HTTP: start (optionally streamed), list, inspect, resume, cancel.

A DAG arrives as a document (a mapping, or its YAML / JSON / TOML text), never as a path:
the daemon reads no file a request names (only the CLI reads DAG files).

Nothing here waits on the store on the event loop: records are awaited
(``DagTasks.runs``), and a run's answer is read, shaped and encoded to JSON in one worker
thread (``_answer``): for a run of 1,000 nodes that is ~100 ms of decoding, copying and
encoding, which would stall every stream and ``/health``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from pcrt.cache.runs import RunNotFound, RunRecord, RunStore
from pcrt.cache.status import RESUMABLE_RUN_STATES, RunStatus
from pcrt.runtime.dag.events import DagEvent
from pcrt.runtime.dag.graph import dag_graph
from pcrt.runtime.dag.library import Library, library_from_documents
from pcrt.runtime.dag.load import looks_like_file_name, parse_dag, parse_dag_text
from pcrt.runtime.dag.spec import DagSpec
from pcrt.runtime.dag.tasks import DagTasks, run_summary, run_view
from pcrt.runtime.errors import InvalidRequest, NotFound, ShapeInvalid
from pcrt.runtime.server.moving import move_run
from pcrt.runtime.server.services import agent_of, services_of
from pcrt.runtime.sse import encode
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter()


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dag: dict[str, Any] | str  # the document, or its YAML / JSON / TOML text
    inputs: dict[str, Any] = {}
    # /lib DAGs (documents or their text) its subgraph nodes may call, over the daemon's
    # library directories for this run
    library: list[dict[str, Any] | str] = []
    stream: bool = False
    wait: bool = True  # without stream: answer when the run ends (else 202 at once)


def _tasks(request: Request) -> DagTasks:
    services = services_of(request)
    return services.dags


def _documents(body: StartRun) -> tuple[DagSpec, Library]:
    """The DAG (DagInvalid: 422 with every problem) and the library it brought."""
    return _spec(body), library_from_documents(body.library)


def _spec(body: StartRun) -> DagSpec:
    """The DAG; with malformed nodes, the part that parsed, which ``runner.create`` then
    refuses with every problem (the malformed nodes' and the models')."""
    try:
        if isinstance(body.dag, str):
            if looks_like_file_name(body.dag):  # refused by its look, whether it exists or not
                raise InvalidRequest(
                    "send the DAG document itself (a mapping, or its YAML, JSON or TOML "
                    "text), not a file name: the daemon reads no files for a request"
                )
            return parse_dag_text(body.dag)
        return parse_dag(body.dag)
    except ShapeInvalid as exc:
        return exc.partial


def _not_found(run_id: str) -> NotFound:
    return NotFound(f"no DAG run {run_id!r}", param="run_id")


async def _get(tasks: DagTasks, run_id: str) -> RunRecord:
    try:
        return await tasks.runs.get_run(run_id)
    except RunNotFound:
        raise _not_found(run_id) from None


async def _answer(
    tasks: DagTasks,
    run: RunRecord | str,
    *,
    status_code: int = 200,
    summary: dict[str, Any] | None = None,
) -> Response:
    """The run (a record, or its id: read as it stands) as the API shows it
    (``run_view``; under "run", after ``summary``, when given), read, shaped and encoded
    in one worker thread."""

    def answer(runs: RunStore) -> Response:
        record = runs.get_run(run) if isinstance(run, str) else run
        view = run_view(runs, record)
        return JSONResponse(view if summary is None else {**summary, "run": view}, status_code)

    try:
        return await to_thread_to_completion(answer, tasks.runs.sync)
    except RunNotFound:
        raise _not_found(run if isinstance(run, str) else run.id) from None


@router.post("/v1/dags")
async def start_run(body: StartRun, request: Request) -> Any:
    tasks = _tasks(request)
    # a 2 MB document is 0.7 s of YAML: parsed in a worker thread, as it is checked
    spec, library = await to_thread_to_completion(_documents, body)
    agent = agent_of(request)
    # a run is one request of its agent's (429 before anything is recorded); its
    # generations' tokens are charged as they finish (DagRunner.usage)
    services_of(request).limiter.admit(agent, 0)
    run = await tasks.runner.create_in_thread(spec, body.inputs, library, agent=agent)
    if body.stream:
        queue = tasks.listen(run.id)
        tasks.start(run.id)
        return StreamingResponse(
            _events(queue, tasks, run.id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-PCRT-Run": run.id},
        )
    tasks.start(run.id)
    if not body.wait:
        return await _answer(tasks, run, status_code=202)
    return await _answer(tasks, await tasks.outcome(run.id))


# how long a watching stream lets events gather before one write sends them all: a tab
# that redraws at 20 Hz needs no write per token, and on two cores each write per tab
# costs decode speed (bench.dashboard)
WATCH_BATCH_S = 0.05


async def _events(
    queue: asyncio.Queue[DagEvent | None], tasks: DagTasks, run_id: str, batch_s: float = 0.0
) -> AsyncIterator[str]:
    """node_started, token, checkpoint, node_finished, run_finished, with node ids; with
    ``batch_s``, the events of that long go in one write (each still its own SSE event).
    A client that leaves stops being fed (the run goes on)."""
    try:
        ended = False
        while not ended:
            waiting = [await queue.get()]
            if batch_s:
                await asyncio.sleep(batch_s)
                while not queue.empty():
                    waiting.append(queue.get_nowait())
            chunk = []
            for event in waiting:
                if event is None:
                    ended = True
                    break
                data = {"run": event.run_id, "node": event.node, **event.data}
                chunk.append(encode(json.dumps(data, default=str), event=event.kind))
            if chunk:
                yield "".join(chunk)
        yield encode("[DONE]")
    finally:
        tasks.unlisten(run_id, queue)


@router.get("/v1/dags")
async def list_runs(request: Request, status: str | None = None) -> Response:
    tasks = _tasks(request)

    def answer(runs: RunStore) -> Response:
        listed = runs.list_runs(status=status)
        return JSONResponse({"object": "list", "data": [run_summary(r) for r in listed]})

    return await to_thread_to_completion(answer, tasks.runs.sync)


@router.get("/v1/dags/{run_id}")
async def get_run(run_id: str, request: Request) -> Response:
    return await _answer(_tasks(request), run_id)


@router.get("/v1/dags/{run_id}/events")
async def watch_run(run_id: str, request: Request) -> StreamingResponse:
    """The events of a run executing here, from now until it stops or the daemon drains
    (what the dashboard draws a live run from); a run not executing here ends the stream
    at once. Follow this first, then read the run (``GET /v1/dags/{id}``): the stream
    listens before its headers leave, so nothing falls between the two."""
    tasks = _tasks(request)
    await _get(tasks, run_id)  # 404 for a run this daemon never had
    queue = tasks.listen(run_id, watching=True)
    if not tasks.running(run_id):
        tasks.unlisten(run_id, queue)
        queue = asyncio.Queue()
        queue.put_nowait(None)
    return StreamingResponse(
        _events(queue, tasks, run_id, batch_s=WATCH_BATCH_S),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-PCRT-Run": run_id},
    )


@router.get("/v1/dags/{run_id}/graph")
async def run_graph(run_id: str, request: Request) -> dict[str, Any]:
    """The run's DAG as a picture's data: nodes in layers and the edges between them
    (``dag.graph``); its template scan runs in a worker thread."""
    run = await _get(_tasks(request), run_id)
    graph: dict[str, Any] = await to_thread_to_completion(dag_graph, run.spec)
    return {"id": run.id, "dag": run.dag_path, **graph}


class ResumeRun(BaseModel):
    """A ``needs_attention`` run's decision on its tool calls in flight: send them again,
    or take ``skip_call`` as what they returned (any JSON)."""

    model_config = ConfigDict(extra="forbid")

    retry_call: bool = False
    skip_call: Any = None


@router.post("/v1/dags/{run_id}/resume")
async def resume_run(
    run_id: str, request: Request, wait: bool = False, body: ResumeRun | None = None
) -> Any:
    tasks = _tasks(request)
    run = await _get(tasks, run_id)
    if run.status not in RESUMABLE_RUN_STATES:
        raise InvalidRequest(
            f"run {run_id} is {run.status}; only {', '.join(RESUMABLE_RUN_STATES)} resume"
        )
    if body is not None:
        skip = (body.skip_call,) if "skip_call" in body.model_fields_set else None
        await tasks.decide(run_id, body.retry_call, skip)
    # a request of the agent the run bills, as starting it was
    services_of(request).limiter.admit(run.agent or agent_of(request), 0)
    tasks.start(run_id, for_peer=run.for_peer is not None)
    if not wait:
        return await _answer(tasks, run_id, status_code=202)
    return await _answer(tasks, await tasks.outcome(run_id))


@router.delete("/v1/dags/{run_id}")
async def cancel_run(run_id: str, request: Request) -> Response:
    """Stop a run now; its finished outputs and checkpoints are kept (resume continues)."""
    tasks = _tasks(request)
    run = await _get(tasks, run_id)
    stopped = await tasks.cancel(run_id)  # a stopped run records its own status
    if not stopped and run.status in (RunStatus.PENDING, RunStatus.INTERRUPTED):
        await tasks.runs.set_status(
            run_id, RunStatus.CANCELLED, error="cancelled; checkpoints kept"
        )
    return await _answer(tasks, run_id)


class MigrateRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str  # the pcrt peer's name, as pcrt peers shows it
    states: bool = True  # false: the record alone, the peer recomputes unfinished nodes


@router.post("/v1/dags/{run_id}/migrate")
async def migrate(run_id: str, body: MigrateRun, request: Request) -> Response:
    """Move an unfinished run, with its KV states, to a pcrt peer that resumes it there.

    The run stops here first (its checkpoints are on disk). If the move fails the run stays
    here, stopped and resumable; nothing is lost."""
    services = services_of(request)
    tasks = services.dags
    run = await _get(tasks, run_id)
    if run.status not in RESUMABLE_RUN_STATES:
        raise InvalidRequest(f"run {run_id} is {run.status}; only unfinished runs move")
    result = await move_run(services, run_id, body.to, with_states=body.states)
    log.info("run %s moved to %s (%d states)", run_id, result.peer, result.states_sent)
    return await _answer(tasks, run_id, summary=result.summary())
