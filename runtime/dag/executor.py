"""Running a DAG: nodes in dependency order, independent ones at once, every step recorded.

A run is created (validated, inputs bound, one pending record per node) and then
executed; execution is also how it resumes. Nodes whose dependencies are done start
together, so the engine batches them. Each ``llm`` node:

- renders its prompt, or continues its ``context`` parent by restoring the parent's
  saved KV and computing only the new turn;
- checkpoints its KV every ``checkpoint_every`` tokens (blob first, record second), and
  saves its final KV when done;
- on resume, continues from its last checkpoint (the sampler replays the tokens it had
  generated, so a schema-constrained output stays valid); a checkpoint or parent state
  that is missing, corrupt or saved by an incompatible engine is refused with a logged
  reason and the node recomputes: slower, never wrong.

Deterministic nodes (temperature 0 or a fixed seed) are cached by their path, rendered
prompt, parameters, model sha256 and engine version; a hit skips inference.

A ``subgraph`` node calls a ``/lib`` DAG from the run's library: it renders and binds its
inputs to the callee's signature, then executes the callee as a child run in the same
store (``subgraph.py`` has the pure parts), under what is left of the caller's budget. Its
tokens and node executions count for the caller; a resume of the caller resumes the
child, whose finished nodes stay finished. A deterministic call is cached whole.

The calling node's ``route`` and ``complexity`` are written into the child's document as
the defaults of the callee's nodes (``DagSpec.called_with``; a callee node's own setting
wins), so the child's nodes are routed like any node, its resume and a peer it moves to
see the same hints, and the call's cache key (over that document) tells a call kept
local from one sent to a peer, which may resolve a tag to another model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import llama_cpp

from pcrt.cache.blobs import BlobCorrupt, BlobMissing, BlobStore
from pcrt.cache.runs import NodeRecord, RunNotFound, RunRecord, RunStore
from pcrt.cache.store import utc_now
from pcrt.cache.usage import UsageRecord
from pcrt.routing.policy import Candidate, Decision, Work
from pcrt.runtime.dag.library import (
    Library,
    calls_subgraphs,
    library_from_documents,
    run_library,
    with_library,
)
from pcrt.runtime.dag.load import parse_dag
from pcrt.runtime.dag.spec import AssertNode, DagSpec, ForkNode, LlmNode, SubgraphNode
from pcrt.runtime.dag.subgraph import (
    budget_limit,
    call_cache_key,
    call_outputs,
    child_budget,
    child_spec,
    generating_nodes,
    is_deterministic,
    jsonable,
)
from pcrt.runtime.dag.templates import (
    check_assert,
    make_environment,
    make_scope,
    render,
    render_value,
)
from pcrt.runtime.dag.validate import bind_inputs, dependencies, validate, validate_callees
from pcrt.runtime.engine import (
    CheckpointEvent,
    Engine,
    GenerateRequest,
    TokenEvent,
)
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.errors import (
    AssertFailed,
    BudgetExceeded,
    DagInvalid,
    InvalidRequest,
    NoRoute,
    PcrtError,
    PeerError,
    PeerUnavailable,
    StateError,
)
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["BudgetExceeded", "DagEvent", "DagRunner", "EngineLease", "Remote", "check_run"]

log = logging.getLogger(__name__)

DAG_ROUTE = "/v1/dags"  # the route usage rows of DAG generations are filed under
MAX_NODES_IN_FLIGHT = 32  # nodes of one run started and not finished

EngineLease = Callable[[str], AbstractAsyncContextManager[Engine]]
"""Given a model name, an async context manager holding its loaded engine."""

ENGINE_VERSION = f"pcrt-0.1/llama-cpp-python-{llama_cpp.__version__}"
# a cancelled run keeps its checkpoints, so it can be resumed like an interrupted one
RESUMABLE = ("pending", "running", "interrupted", "cancelled")


class Remote(Protocol):
    """Peers as the executor sees them (``pcrt.routing.remote.RemoteRunner``)."""

    @property
    def enabled(self) -> bool: ...

    def decide(self, work: Work) -> Decision: ...

    def known_names(self) -> tuple[set[str], set[str]]: ...

    def failed(self, exc: PeerError) -> None: ...

    async def chat(
        self,
        candidate: Candidate,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        on_text: Callable[[int, str], None],
    ) -> Any: ...

    async def subgraph(
        self,
        candidate: Candidate,
        payload: dict[str, Any],
        timeout: float | None,
        agent: str | None = None,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DagEvent:
    """What a streaming client sees: run_started, node_started, token, checkpoint,
    node_finished, run_finished."""

    kind: str
    run_id: str
    node: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    record: RunRecord
    spec: DagSpec
    outputs: dict[str, Any]
    tokens_used: int
    nodes_executed: int
    emit: Callable[[DagEvent], None]
    library: Library  # what the run's subgraph nodes call: the documents it was created with


@dataclass(frozen=True)
class _Call:
    """What a subgraph node produced and what it counts for in the caller's budget."""

    output: dict[str, Any]
    tokens: int
    executed: int


def check_run(
    spec: DagSpec,
    registry: Registry,
    inputs: dict[str, Any],
    remote: tuple[set[str], set[str]] | None = None,
    library: Library | None = None,
) -> dict[str, Any]:
    """Everything a run is checked for before it exists (DagInvalid lists every problem);
    returns the bound inputs. The CLI calls it too, before loading or sending anything.
    ``remote`` adds the model names and tags trusted peers offer. ``library`` is what
    subgraph nodes call (``run_library``; without it, the documents ``spec`` carries): the
    callees are validated too, and a library that failed to load is reported when the DAG
    calls subgraphs."""
    names = set(registry.entries)
    aliases = {a for e in registry.entries.values() for a in e.aliases}
    tags = {t for e in registry.entries.values() for t in e.tags}
    if remote is not None:
        names |= remote[0]
        tags |= remote[1]
    if library is None:
        library = run_library(spec, dirs=())
    models = names | aliases
    problems = list(library.problems) if calls_subgraphs(spec) else []
    problems += validate(spec, known_models=models, known_tags=tags, library=library.dags)
    problems += validate_callees(
        library.closure(spec).values(),
        known_models=models,
        known_tags=tags,
        library=library.dags,
    )
    if problems:
        raise DagInvalid(problems, source=spec.dag)
    return bind_inputs(spec, inputs)


class DagRunner:
    def __init__(
        self,
        *,
        registry: Registry,
        runs: RunStore,
        blobs: BlobStore,
        lease: EngineLease,
        ran_on: str = "local",
        cache_entries: int = 10_000,
        remote: Remote | None = None,
        library_dirs: Sequence[Path] | None = None,
        usage: Callable[[UsageRecord], None] | None = None,
    ) -> None:
        self.remote = remote
        # the daemon's accounting: one row per generation, as for an HTTP request (None:
        # the CLI runs DAGs unaccounted, as it runs single prompts)
        self.usage = usage
        # None: the directories of the environment (Paths.lib_dirs), read at each run's
        # creation, so library files added meanwhile count
        self.library_dirs = library_dirs
        self.registry = registry
        self.runs = runs
        self.blobs = blobs
        self.lease = lease
        self.ran_on = ran_on
        self.cache_entries = cache_entries
        self.env = make_environment()

    # -- creating -----------------------------------------------------------------

    def create(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        library: Library | None = None,
        *,
        agent: str | None = None,
    ) -> RunRecord:
        """Validate (every problem at once: DagInvalid), bind inputs, record the run.
        ``library``: documents the request brought, over the library directories; the run
        records every library DAG it can reach, for its resume. ``agent``: whom its
        generations are billed to."""
        remote = self.remote.known_names() if self.remote and self.remote.enabled else None
        dirs = self.library_dirs if self.library_dirs is not None else Paths.from_env().lib_dirs
        resolved = run_library(spec, dirs, library)
        bound = check_run(spec, self.registry, inputs, remote, resolved)
        return self._record(with_library(spec, resolved.closure(spec)), bound, agent=agent)

    def _record(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        parent: tuple[str, str] | None = None,
        agent: str | None = None,
    ) -> RunRecord:
        run_id = uuid.uuid4().hex[:12]
        nodes = [(node_id, node.path, node.type) for node_id, node in spec.nodes.items()]
        return self.runs.create_run(
            run_id, spec.dag, spec.document(), inputs, nodes, parent=parent, agent=agent
        )

    def create_partial(
        self,
        spec: DagSpec,
        inputs: dict[str, Any],
        done: dict[str, Any],
        origin: str,
        *,
        agent: str | None = None,
    ) -> RunRecord:
        """A run of part of a DAG for a peer: ``done`` nodes are recorded as finished
        (where ``origin`` ran them) and only the rest execute here."""
        unknown = set(done) - set(spec.nodes)
        if unknown:
            raise InvalidRequest(f"outputs given for unknown nodes: {sorted(unknown)}")
        record = self.create(spec, inputs, agent=agent)
        for node_id, output in done.items():
            self.runs.update_node(
                record.id,
                node_id,
                status="succeeded",
                output=output,
                ran_on=origin,
                finished_at=utc_now(),
            )
        return record

    # -- executing ----------------------------------------------------------------

    async def execute(
        self, run_id: str, on_event: Callable[[DagEvent], None] | None = None
    ) -> RunRecord:
        """Run (or resume) until every node is done, a node fails, or a budget is hit."""
        record = self.runs.get_run(run_id)
        if record.status not in RESUMABLE:
            return record
        spec = parse_dag(record.spec)
        done = {n.node_id: n.output for n in self.runs.nodes(run_id) if n.status == "succeeded"}
        run = _Run(
            record,
            spec,
            done,
            record.tokens_used,
            record.nodes_executed,
            on_event or _ignore,
            library_from_documents(spec.library, origin=f"{spec.dag} library"),
        )
        self.runs.set_status(run_id, "running")
        run.emit(DagEvent("run_started", run_id, data={"resumed": bool(done)}))
        timeout = spec.budget.timeout_sec
        status, error = "succeeded", None
        try:
            async with asyncio.timeout(timeout):
                await self._schedule(run)
        except TimeoutError:
            status, error = "budget_exceeded", f"budget exceeded: timeout_sec ({timeout} s)"
        except BudgetExceeded as exc:
            status, error = "budget_exceeded", str(exc)
        except asyncio.CancelledError:
            self.runs.set_status(run_id, "cancelled", error="cancelled; checkpoints kept")
            run.emit(DagEvent("run_finished", run_id, data={"status": "cancelled"}))
            raise
        except (PcrtError, AssertFailed) as exc:
            status, error = "failed", str(exc)
        except Exception as exc:  # a bug must not leave the run "running" forever
            log.exception("run %s failed unexpectedly", run_id)
            status, error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        self.runs.set_status(run_id, status, error=error)
        final = self.runs.get_run(run_id)
        run.emit(
            DagEvent(
                "run_finished",
                run_id,
                data={"status": status, "error": error, "outputs": run.outputs},
            )
        )
        return final

    async def _schedule(self, run: _Run) -> None:
        deps = dependencies(run.spec)
        pending = [n for n in run.spec.nodes if n not in run.outputs]
        running: dict[asyncio.Task[dict[str, Any]], str] = {}
        try:
            while pending or running:
                # a bounded number at a time: a thousand ready asserts started at once
                # would queue a thousand steps ahead of every other request on the loop
                room = MAX_NODES_IN_FLIGHT - len(running)
                ready = [n for n in pending if deps[n] <= run.outputs.keys()][:room]
                for node_id in ready:
                    pending.remove(node_id)
                    self._check_budget(run, starting=len(running))
                    task = asyncio.create_task(self._node(run, node_id), name=f"dag-{node_id}")
                    running[task] = node_id
                if not running:
                    stuck = ", ".join(pending)
                    raise PcrtError(f"nodes {stuck} wait for nodes that failed or never ran")
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    running.pop(task)
                    # a failure propagates from here; a subgraph sent whole to a peer
                    # answers for several nodes at once
                    for node_id, output in task.result().items():
                        run.outputs[node_id] = output
                        if node_id in pending:
                            pending.remove(node_id)
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(BaseException):
                    await task

    def _check_budget(self, run: _Run, starting: int) -> None:
        budget = run.spec.budget
        if budget.max_nodes is not None and run.nodes_executed + starting >= budget.max_nodes:
            raise BudgetExceeded("max_nodes", f"{budget.max_nodes} nodes executed")
        if budget.max_tokens is not None and run.tokens_used >= budget.max_tokens:
            raise BudgetExceeded("max_tokens", f"{run.tokens_used} of {budget.max_tokens} used")

    # -- nodes --------------------------------------------------------------------

    async def _node(self, run: _Run, node_id: str) -> dict[str, Any]:
        node = run.spec.nodes[node_id]
        run_id = run.record.id
        run.emit(DagEvent("node_started", run_id, node_id, {"type": node.type}))
        started = time.perf_counter()
        scope = make_scope(run.record.inputs, run.outputs)
        others: dict[str, Any] = {}  # outputs of a subgraph that ran whole on a peer
        executed = 1  # node executions it counts for in the budget
        try:
            if isinstance(node, AssertNode):
                check_assert(self.env, node.that, scope, node=node_id, message=node.message)
                output: Any = True
                tokens = 0
            elif isinstance(node, ForkNode) and node.branches is not None:
                output, tokens = [run.outputs[b] for b in node.branches], 0
            elif isinstance(node, SubgraphNode):
                call = await self._call_subgraph(run, node, scope)
                output, tokens, executed = call.output, call.tokens, call.executed
            elif isinstance(node, LlmNode | ForkNode):
                decision = self._route(run, node, scope)
                if decision is None:
                    output, tokens = await self._generate(run, node, scope)
                else:
                    produced, tokens = await self._generate_routed(run, node, scope, decision)
                    output = produced.pop(node_id)
                    others = produced
            else:
                raise InvalidRequest(f"node {node_id}: type {node.type!r} cannot run")
        except (PcrtError, AssertFailed) as exc:
            if isinstance(exc, BudgetExceeded) and self._finished(run_id, node_id):
                # it finished, and spent the last of the budget: its output is kept
                run.nodes_executed += executed
                run.emit(DagEvent("node_finished", run_id, node_id, {"status": "succeeded"}))
                raise
            self.runs.update_node(run_id, node_id, status="failed", error=str(exc))
            run.emit(
                DagEvent("node_finished", run_id, node_id, {"status": "failed", "error": str(exc)})
            )
            raise
        # generations and calls write their own record (tokens, states, cache)
        if not (_generates(node) or isinstance(node, SubgraphNode)):
            self.runs.finish_node(
                run_id,
                node_id,
                tokens=0,
                status="succeeded",
                output=output,
                seconds=time.perf_counter() - started,
                ran_on=self.ran_on,
            )
        run.nodes_executed += executed + len(others)
        run.tokens_used += tokens
        run.emit(
            DagEvent("node_finished", run_id, node_id, {"status": "succeeded", "output": output})
        )
        return {node_id: output, **others}

    def _finished(self, run_id: str, node_id: str) -> bool:
        return self.runs.node(run_id, node_id).status == "succeeded"

    # -- subgraph calls -------------------------------------------------------------

    async def _call_subgraph(self, run: _Run, node: SubgraphNode, scope: dict[str, Any]) -> _Call:
        """Run the callee as a child run (or resume the one an earlier attempt started), or
        answer from the subgraph cache; then record the call on the calling node."""
        run_id = run.record.id
        started = time.perf_counter()
        prepared = await self._prepare_call(run, node, scope)
        if isinstance(prepared, _Call):
            return prepared  # a cache hit
        child, spec, key = prepared
        final = await self.execute(child.id, _forwarded(run.emit))
        if final.status == "budget_exceeded":
            limit, detail = budget_limit(final.error)
            raise BudgetExceeded(limit, f"{detail}, in {node.dag} called by node {node.id!r}")
        if final.status != "succeeded":
            raise PcrtError(
                f"node {node.id!r}: {node.dag} (run {child.id}) {final.status}: {final.error}"
            )
        records = self.runs.nodes(child.id)
        outputs = {n.node_id: n.output for n in records if n.status == "succeeded"}
        output = call_outputs(self.env, spec, final.inputs, outputs, node=node.id)
        tokens = final.tokens_used
        self.runs.finish_node(
            run_id,
            node.id,
            tokens=tokens,
            executed=final.nodes_executed,
            status="succeeded",
            output=output,
            cache_hit=0,
            ran_on=self.ran_on,
            completion_tokens=tokens,
            prompt_tokens=sum(n.prompt_tokens or 0 for n in records),
            cached_tokens=sum(n.cached_tokens or 0 for n in records),
            seconds=time.perf_counter() - started,
        )
        if key is not None:
            self.runs.cache_put(key, node.dag, output, tokens, self.cache_entries)
        _stop_past_budget(run, tokens)
        return _Call(output, tokens, final.nodes_executed)

    async def _prepare_call(
        self, run: _Run, node: SubgraphNode, scope: dict[str, Any]
    ) -> _Call | tuple[RunRecord, DagSpec, str | None]:
        """The child run to execute, its document and cache key: the child an earlier
        attempt started, else a new one; or, for a new call the cache knows, its result."""
        run_id = run.record.id
        child = self._existing_child(self.runs.node(run_id, node.id))
        if child is not None:  # resumed: the child knows its document and inputs
            spec = parse_dag(child.spec, source=f"run {child.id}")
            key = await self._call_key(node, spec, child.inputs)
            self.runs.update_node(run_id, node.id, status="running", ran_on=self.ran_on)
            return child, spec, key
        callee = run.library.dags.get(node.dag)
        if callee is None:
            raise PcrtError(f"node {node.id!r}: the library of this run has no {node.dag}")
        inputs = self._call_inputs(node, callee, scope)
        budget = child_budget(callee.budget, run.spec.budget, run.tokens_used, run.nodes_executed)
        spec = child_spec(callee, run.library, budget).called_with(node.route, node.complexity)
        key = await self._call_key(node, spec, inputs)
        cached = self.runs.cache_get(key) if key is not None else None
        if cached is not None:
            self.runs.finish_node(
                run_id,
                node.id,
                tokens=0,
                status="succeeded",
                output=cached,
                cache_hit=1,
                ran_on=self.ran_on,
                completion_tokens=0,
                seconds=0.0,
            )
            return _Call(cached, 0, 1)
        self.runs.update_node(
            run_id, node.id, status="running", started_at=utc_now(), ran_on=self.ran_on
        )
        # a call's generations bill the caller's agent
        return self._record(spec, inputs, (run_id, node.id), run.record.agent), spec, key

    def _existing_child(self, record: NodeRecord) -> RunRecord | None:
        if record.child_run_id is None:
            return None
        try:
            return self.runs.get_run(record.child_run_id)
        except RunNotFound:  # a run moved here from a peer comes without its children
            return None

    def _call_inputs(
        self, node: SubgraphNode, callee: DagSpec, scope: dict[str, Any]
    ) -> dict[str, Any]:
        """The node's inputs rendered over the caller's values, bound to the callee's
        signature (defaults filled in, types checked)."""
        rendered = {
            name: jsonable(
                render_value(self.env, value, scope, node=node.id),
                f"node {node.id!r}: input {name!r}",
            )
            for name, value in node.inputs.items()
        }
        try:
            return bind_inputs(callee, rendered)
        except DagInvalid as exc:
            reasons = "; ".join(str(p) for p in exc.problems)
            raise InvalidRequest(
                f"node {node.id!r}: the inputs do not fit {node.dag}'s signature: {reasons}"
            ) from None

    async def _call_key(
        self, node: SubgraphNode, spec: DagSpec, inputs: dict[str, Any]
    ) -> str | None:
        """The call's subgraph cache key, or None when it must not be cached."""
        carried = library_from_documents(spec.library)
        if not node.cache or not is_deterministic(spec, carried):
            return None
        names = {
            self.registry.resolve(n.model or n.tag).name for n in generating_nodes(spec, carried)
        }
        model_sha256s = []
        for name in sorted(names):
            async with self.lease(name) as engine:  # the sha256 the engine checked on load
                model_sha256s.append(engine.compat_key.model_sha256)
        return call_cache_key(node.dag, inputs, spec.document(), model_sha256s, ENGINE_VERSION)

    # -- routing (issue 6) ----------------------------------------------------------

    def _route(self, run: _Run, node: LlmNode | ForkNode, scope: dict[str, Any]) -> Decision | None:
        """Where the node should run, or None for "here, no question" (no peers, or the
        node says ``route: local``)."""
        if self.remote is None or not self.remote.enabled or node.route == "local":
            return None
        text = (node.system or "") + (node.prompt or "")
        with contextlib.suppress(PcrtError):
            text = render(self.env, node.prompt or "", scope, node=node.id)
        budget = run.spec.budget
        work = Work(
            # neither model nor tag: each node offers its best model (here, the default)
            model=node.model,
            tag=node.tag,
            prompt_tokens=len(text) // 4,  # an estimate: no tokenizer for a peer's model
            max_tokens=node.max_tokens or 512,
            has_schema=node.output_schema is not None,
            complexity=node.complexity,
            route=node.route,
            timeout_s=budget.timeout_sec,
        )
        return self.remote.decide(work)

    async def _generate_routed(
        self, run: _Run, node: LlmNode | ForkNode, scope: dict[str, Any], decision: Decision
    ) -> tuple[dict[str, Any], int]:
        """Try the decision's candidates in order; a peer that fails hands the node to the
        next one (a DAG node's partial remote output is dropped and recomputed)."""
        assert self.remote is not None
        run_id = run.record.id
        if decision.chosen is None:
            if node.route == "peer":
                raise NoRoute(f"node {node.id}: {decision.reason}")
            output, tokens = await self._generate(run, node, scope)  # local decides: errors
            return {node.id: output}, tokens
        attempts: list[dict[str, str]] = []
        for candidate in decision.candidates:
            routing = {
                "reason": decision.reason,
                "ran_on": candidate.node,
                "attempts": list(attempts),
            }
            if candidate.kind == "local":
                self.runs.update_node(run_id, node.id, routing=routing)
                output, tokens = await self._generate(run, node, scope)
                return {node.id: output}, tokens
            try:
                if candidate.kind == "pcrt":
                    return await self._subgraph_on_peer(run, node, candidate, routing)
                output, tokens = await self._generate_on_peer(run, node, scope, candidate, routing)
                return {node.id: output}, tokens
            except PeerError as exc:
                if isinstance(exc, PeerUnavailable):
                    self.remote.failed(exc)  # out of rotation now, not at the next check
                attempts.append({"node": candidate.node, "error": str(exc)})
                log.warning("node %s: %s; trying the next candidate", node.id, exc)
                run.emit(
                    DagEvent(
                        "fallback", run_id, node.id, {"from": candidate.node, "error": str(exc)}
                    )
                )
        tried = "; ".join(f"{a['node']}: {a['error']}" for a in attempts)
        raise PeerUnavailable(f"node {node.id}: every candidate failed ({tried})", peer="")

    async def _generate_on_peer(
        self,
        run: _Run,
        node: LlmNode | ForkNode,
        scope: dict[str, Any],
        candidate: Candidate,
        routing: dict[str, Any],
    ) -> tuple[Any, int]:
        """One generation as a chat completion on an OpenAI-compatible peer."""
        assert self.remote is not None
        run_id, node_id = run.record.id, node.id
        messages, _ = await self._conversation(run, node, scope, None)
        sampling = SamplingParams(**node.sampling())
        budget = run.spec.budget.max_tokens
        max_tokens = sampling.max_tokens
        if budget is not None:
            max_tokens = min(max_tokens, budget - run.tokens_used)
        params: dict[str, Any] = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": max_tokens,
        }
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        if run.record.agent:
            params["user"] = run.record.agent  # OpenAI's end-user field: the peer's billing
        samples = node.samples if isinstance(node, ForkNode) and node.samples else 1
        if samples > 1:
            params["n"] = samples
        self.runs.update_node(
            run_id,
            node_id,
            status="running",
            model=candidate.model,
            started_at=utc_now(),
            ran_on=candidate.node,
            routing=routing,
        )

        def on_text(index: int, text: str) -> None:
            run.emit(DagEvent("token", run_id, node_id, {"index": index, "text": text}))

        result = await self.remote.chat(
            candidate,
            [{"role": m.role, "content": m.text()} for m in messages],
            params,
            node.output_schema,
            on_text,
        )
        texts = list(result.texts) + [""] * (samples - len(result.texts))
        try:
            outputs = [self._parse(node, text) for text in texts[:samples]]
        except PcrtError as exc:
            raise PeerError(f"{exc} (from peer {candidate.node})", peer=candidate.node) from None
        if node.output_schema is not None:
            for value in outputs:
                try:
                    jsonschema.validate(value, node.output_schema)
                except jsonschema.ValidationError as exc:
                    # the peer's constrained decoding failed us (llama-cpp-python's server
                    # ignores the grammar at temperature 0): the next candidate tries
                    raise PeerError(
                        f"node {node_id}: peer {candidate.node} answered JSON that breaks the "
                        f"node's schema: {exc.message}",
                        peer=candidate.node,
                    ) from None
        output: Any = outputs if isinstance(node, ForkNode) else outputs[0]
        tokens = result.completion_tokens
        self.runs.finish_node(
            run_id,
            node_id,
            tokens=tokens,
            status="succeeded",
            output=output,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=tokens,
            cached_tokens=result.cached_tokens,
            seconds=result.seconds,
        )
        self._bill(run, node_id)
        _stop_past_budget(run, tokens)
        return output, tokens

    def _peer_group(self, run: _Run, node: LlmNode | ForkNode) -> list[str]:
        """The subgraph that goes whole with ``node``: it and the later nodes routed alike
        (same route, complexity, model and tag) whose inputs all come from finished nodes
        or from the group itself; asserts and branch forks over the group go along, and so
        do subgraph calls without routing hints or with the same route and complexity."""
        deps = dependencies(run.spec)
        hints = _hints(node)
        assert hints is not None  # a node that generates
        group = [node.id]
        changed = True
        while changed:
            changed = False
            for other_id, other in run.spec.nodes.items():
                if other_id in group or other_id in run.outputs:
                    continue
                if not deps[other_id] & set(group):
                    continue  # not downstream of the group
                if not deps[other_id] <= set(group) | run.outputs.keys():
                    continue
                if isinstance(other, LlmNode | ForkNode) and _hints(other) not in (None, hints):
                    continue  # routed differently: it decides on its own
                if isinstance(other, SubgraphNode) and _call_hints(other) not in (None, hints[:2]):
                    continue  # its callee is routed by its own hints, from here
                group.append(other_id)
                changed = True
        return group

    async def _subgraph_on_peer(
        self, run: _Run, node: LlmNode | ForkNode, candidate: Candidate, routing: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        """Send the node's subgraph whole to a pcrt peer; record what comes back."""
        assert self.remote is not None
        run_id = run.record.id
        group = self._peer_group(run, node)
        limit = run.spec.budget.max_nodes
        if limit is not None and run.nodes_executed + len(group) > limit:
            group = group[: max(1, limit - run.nodes_executed)]  # no more than the budget
        deps = dependencies(run.spec)
        needed: set[str] = set()
        frontier = [d for g in group for d in deps[g]]
        while frontier:  # every upstream node the group's templates and contexts reach
            current = frontier.pop()
            if current not in needed and current not in group:
                needed.add(current)
                frontier.extend(deps[current])
        document = run.spec.document()
        nodes_doc = {}
        for node_id in [*sorted(needed), *group]:
            raw = dict(document["nodes"][node_id])
            if node_id in group and raw.get("type") in ("llm", "fork", "subgraph"):
                # it runs there, never sent on again (a call's callee inherits it)
                raw["route"] = "local"
            nodes_doc[node_id] = raw
        budget = run.spec.budget
        document["nodes"] = nodes_doc
        if "signature" in document:
            # part of a callee: the peer answers with node records, not the callee's
            # outputs, which may name nodes it is not sent
            document["signature"] = {**document["signature"], "outputs": {}}
        document["budget"] = {
            k: v
            for k, v in {
                "max_tokens": None
                if budget.max_tokens is None
                else max(1, budget.max_tokens - run.tokens_used),
                "timeout_sec": budget.timeout_sec,
            }.items()
            if v is not None
        }
        payload = {
            "dag": document,
            "inputs": run.record.inputs,
            "done": {n: run.outputs[n] for n in sorted(needed)},
            "nodes": group,
        }
        for node_id in group:
            if node_id != node.id:
                run.emit(
                    DagEvent(
                        "node_started", run_id, node_id, {"type": run.spec.nodes[node_id].type}
                    )
                )
            self.runs.update_node(
                run_id,
                node_id,
                status="running",
                started_at=utc_now(),
                ran_on=candidate.node,
                routing=routing,
            )
        try:
            result = await self.remote.subgraph(
                candidate, payload, budget.timeout_sec, run.record.agent
            )
            if result.get("status") != "succeeded":  # the next candidate may do better
                raise PeerError(
                    f"the subgraph from node {node.id} failed on peer {candidate.node}: "
                    f"{result.get('error') or result.get('status')}",
                    peer=candidate.node,
                )
        except PeerError:
            for node_id in group:  # back to waiting: the next candidate decides for them
                if node_id != node.id:
                    self.runs.update_node(run_id, node_id, status="pending", ran_on=None)
            raise
        records = result["nodes"]
        outputs: dict[str, Any] = {}
        total = 0
        for node_id in group:
            rec = records.get(node_id)
            if not isinstance(rec, dict) or rec.get("status") != "succeeded":
                raise PcrtError(f"peer {candidate.node} did not finish node {node_id}")
            tokens = rec.get("completion_tokens")
            tokens = tokens if isinstance(tokens, int) else 0
            total += tokens
            self.runs.finish_node(
                run_id,
                node_id,
                tokens=tokens,
                status="succeeded",
                output=rec.get("output"),
                prompt_tokens=rec.get("prompt_tokens"),
                completion_tokens=tokens,
                cached_tokens=rec.get("cached_tokens"),
                seconds=rec.get("seconds"),
                model=rec.get("model"),
                cache_hit=int(bool(rec.get("cache_hit"))),
                ran_on=candidate.node,
            )
            sent = run.spec.nodes[node_id]
            # generations, and calls whose generations all ran inside them there; not
            # branch forks or asserts, which generate nothing of their own
            if _generates(sent) or isinstance(sent, SubgraphNode):
                self._bill(run, node_id)
            outputs[node_id] = rec.get("output")
            if node_id != node.id:
                run.emit(
                    DagEvent(
                        "node_finished",
                        run_id,
                        node_id,
                        {"status": "succeeded", "output": outputs[node_id]},
                    )
                )
        _stop_past_budget(run, total)
        return outputs, total

    async def _generate(
        self, run: _Run, node: LlmNode | ForkNode, scope: dict[str, Any]
    ) -> tuple[Any, int]:
        run_id, node_id = run.record.id, node.id
        entry = self.registry.resolve(node.model or node.tag)
        params = dict(node.sampling())
        budget = run.spec.budget.max_tokens
        samples = node.samples if isinstance(node, ForkNode) and node.samples else 1
        capped = False  # the budget, not the node, sets how far it may generate
        if budget is not None:
            remaining = max(1, (budget - run.tokens_used) // samples)  # shared by samples
            capped = remaining < params.get("max_tokens", remaining + 1)
            params["max_tokens"] = min(params.get("max_tokens", remaining), remaining)
        sampling = SamplingParams(**params)
        record = self.runs.node(run_id, node_id)
        async with self.lease(entry.name) as engine:
            messages, context_state = await self._conversation(run, node, scope, engine)
            base = GenerateRequest(messages=messages, sampling=sampling, n=samples)
            prompt = engine.tokenize_request(base)
            key = self._cache_key(node, prompt, sampling, engine)
            if key is not None:
                cached = self.runs.cache_get(key)
                if cached is not None:
                    self.runs.finish_node(
                        run_id,
                        node_id,
                        tokens=0,
                        status="succeeded",
                        output=cached,
                        cache_hit=1,
                        ran_on=self.ran_on,
                        model=entry.name,
                        prompt_tokens=len(prompt),
                        cached_tokens=None,
                        completion_tokens=0,
                        state_sha256=None,
                        checkpoint_sha256=None,
                        seconds=0.0,
                    )
                    return cached, 0
            if samples > 1:
                forked, spent, cut = await self._fork(
                    run, node, engine, prompt, sampling, samples, context_state
                )
                if key is not None:
                    self.runs.cache_put(key, node.path, forked, spent, self.cache_entries)
                _stop_past_budget(run, spent, cut=capped and cut)
                return forked, spent
            resume = await self._checkpoint_to_resume(record, engine)
            before: list[int] = []
            if resume is not None:
                before = resume.continuation[record.prompt_tokens or 0 :]
                request = GenerateRequest(
                    prompt=[],
                    state=resume,
                    generated_prefix=tuple(before),
                    sampling=sampling.model_copy(
                        update={"max_tokens": max(0, sampling.max_tokens - len(before))}
                    ),
                    export_state=True,
                    checkpoint_every=node.checkpoint_every,
                )
            else:
                request = GenerateRequest(
                    prompt=prompt,
                    sampling=sampling,
                    n=samples,
                    context_state=context_state,
                    export_state=samples == 1,
                    checkpoint_every=node.checkpoint_every,
                )
            self.runs.update_node(
                run_id,
                node_id,
                status="running",
                model=entry.name,
                started_at=record.started_at or utc_now(),
                ran_on=self.ran_on,
                prompt_tokens=record.prompt_tokens if resume else len(prompt),
                resumed_from_checkpoint=int(resume is not None),
            )
            started = time.perf_counter()
            handle = engine.submit(request)
            async for event in handle:
                if isinstance(event, TokenEvent) and event.text:
                    run.emit(
                        DagEvent(
                            "token", run_id, node_id, {"index": event.index, "text": event.text}
                        )
                    )
                elif isinstance(event, CheckpointEvent):
                    # blob and record in one thread: a run stopped meanwhile (timeout,
                    # cancel) still keeps this checkpoint on the node's record
                    saved = await to_thread_to_completion(
                        self._save_checkpoint,
                        event.state,
                        run_id,
                        node_id,
                        len(before) + len(event.tokens),
                    )
                    if saved:
                        run.emit(
                            DagEvent(
                                "checkpoint",
                                run_id,
                                node_id,
                                {"tokens": len(before) + len(event.tokens)},
                            )
                        )
            result = handle.result
            assert result is not None
            texts = [
                (engine.model.detokenize(before) if before else "") + choice.text
                for choice in result.choices
            ]
            outputs = [self._parse(node, text) for text in texts]
            output: Any = outputs if isinstance(node, ForkNode) else outputs[0]
            state = result.choices[0].state if samples == 1 else None
            state_sha = (
                await to_thread_to_completion(self._save_state, state, run_id)
                if state is not None
                else None
            )
            tokens = result.completion_tokens
            self.runs.finish_node(
                run_id,
                node_id,
                tokens=tokens,
                status="succeeded",
                output=output,
                completion_tokens=len(before) + tokens,
                cached_tokens=result.cached_tokens,
                seconds=time.perf_counter() - started,
                state_sha256=state_sha,
            )
            self._bill(run, node_id)
            if key is not None:
                self.runs.cache_put(key, node.path, output, tokens, self.cache_entries)
            cut = any(c.finish_reason == "length" for c in result.choices)
            _stop_past_budget(run, tokens, cut=capped and cut)
            return output, tokens

    async def _fork(
        self,
        run: _Run,
        node: LlmNode | ForkNode,
        engine: Engine,
        prompt: list[int],
        sampling: SamplingParams,
        samples: int,
        context_state: KVState | None,
    ) -> tuple[list[Any], int, bool]:
        """N continuations of one prompt: outputs, tokens, and whether any sample ended
        on its token limit. More samples than the engine has slots run as several forks;
        chunk k's seed is offset by its first index, so sample i always draws with seed + i,
        exactly as one big fork would."""
        run_id, node_id = run.record.id, node.id
        self.runs.update_node(
            run_id,
            node_id,
            status="running",
            model=engine.name,
            started_at=utc_now(),
            ran_on=self.ran_on,
            prompt_tokens=len(prompt),
        )
        started = time.perf_counter()
        width = engine.config.parallel
        handles = []
        for first in range(0, samples, width):
            chunk = sampling
            if sampling.seed is not None:
                chunk = sampling.model_copy(update={"seed": sampling.seed + first})
            n = min(width, samples - first)
            request = GenerateRequest(
                prompt=prompt, sampling=chunk, n=n, context_state=context_state
            )
            handles.append((first, engine.submit(request)))
        texts: list[str] = [""] * samples
        tokens = cached = 0
        cut = False
        for first, handle in handles:
            async for event in handle:
                if isinstance(event, TokenEvent) and event.text:
                    data = {"index": first + event.index, "text": event.text}
                    run.emit(DagEvent("token", run_id, node_id, data))
            result = handle.result
            assert result is not None
            for choice in result.choices:
                texts[first + choice.index] = choice.text
                cut = cut or choice.finish_reason == "length"
            tokens += result.completion_tokens
            cached += result.cached_tokens
        output = [self._parse(node, text) for text in texts]
        self.runs.finish_node(
            run_id,
            node_id,
            tokens=tokens,
            status="succeeded",
            output=output,
            completion_tokens=tokens,
            cached_tokens=cached,
            seconds=time.perf_counter() - started,
        )
        self._bill(run, node_id)
        return output, tokens, cut

    async def _conversation(
        self, run: _Run, node: LlmNode | ForkNode, scope: dict[str, Any], engine: Engine | None
    ) -> tuple[list[ChatMessage], KVState | None]:
        """The node's chat: its own turn, after its ``context`` parent's whole conversation.
        Without an engine (a peer runs it) the parent's state is not loaded."""
        turns: list[ChatMessage] = []
        state: KVState | None = None
        if node.context is not None:
            parent = run.spec.nodes[node.context]
            assert isinstance(parent, LlmNode)
            # only the direct parent's state is restored: its KV holds every ancestor's turns
            parent_turns, _ = await self._conversation(run, parent, scope, None)
            answer = run.outputs[node.context]
            text = answer if isinstance(answer, str) else json.dumps(answer)
            turns = [*parent_turns, ChatMessage(role="assistant", content=text)]
            record = self.runs.node(run.record.id, node.context)
            if engine is not None:
                state = await self._load_state(record.state_sha256, engine, f"{node.context}'s KV")
        elif node.system is not None:
            system = render(self.env, node.system, scope, node=node.id)
            turns = [ChatMessage(role="system", content=system)]
        assert node.prompt is not None
        prompt = render(self.env, node.prompt, scope, node=node.id)
        return [*turns, ChatMessage(role="user", content=prompt)], state

    def _bill(self, run: _Run, node_id: str) -> None:
        """The usage row of a generation that just finished, from its node record: billed
        to the run's agent, ``ran_on`` the machine that did the work. A cache hit spent
        nothing and bills nothing; accounting never fails the run."""
        if self.usage is None:
            return
        try:
            rec = self.runs.node(run.record.id, node_id)
            if rec.cache_hit:
                return
            spec = run.spec.nodes[node_id]
            model = rec.model or (f"subgraph {spec.dag}" if isinstance(spec, SubgraphNode) else "")
            self.usage(
                UsageRecord(
                    agent=run.record.agent or "anonymous",
                    model=model,
                    route=DAG_ROUTE,
                    status=200,
                    prompt_tokens=rec.prompt_tokens or 0,
                    cached_tokens=rec.cached_tokens or 0,
                    completion_tokens=rec.completion_tokens or 0,
                    total_ms=(rec.seconds or 0.0) * 1000,
                    ran_on=rec.ran_on or self.ran_on,
                    request_id=f"{run.record.id}/{node_id}",
                )
            )
        except Exception:
            log.exception("could not bill node %s of run %s", node_id, run.record.id)

    def _save_state(self, state: KVState, run_id: str) -> str | None:
        """Serialise and store a state: in a worker thread, since hashing and joining tens
        of MB on the event loop would stall every other node's stream. None when the disk
        refuses it (full, read-only): a state is insurance, and losing it must not fail
        the generation it insures (whatever needed it recomputes instead)."""
        try:
            return self.blobs.put(state.to_bytes(), run_id=run_id)
        except OSError as exc:
            log.warning(
                "run %s: a KV state could not be saved (%s); going on without it", run_id, exc
            )
            return None

    def _save_checkpoint(self, state: KVState, run_id: str, node_id: str, tokens: int) -> bool:
        """The node's newest checkpoint replaces its previous one, on record and on disk;
        False when it could not be saved (the previous one stays)."""
        previous = self.runs.node(run_id, node_id).checkpoint_sha256
        sha = self._save_state(state, run_id)
        if sha is None:
            return False
        self.runs.update_node(run_id, node_id, checkpoint_sha256=sha, checkpoint_tokens=tokens)
        if previous is not None and previous != sha:
            self.blobs.drop_superseded(previous)
        return True

    async def _checkpoint_to_resume(self, record: NodeRecord, engine: Engine) -> KVState | None:
        if record.status not in ("interrupted", "running") or not record.checkpoint_sha256:
            return None
        return await self._load_state(
            record.checkpoint_sha256, engine, f"checkpoint of {record.node_id}"
        )

    async def _load_state(self, sha: str | None, engine: Engine, what: str) -> KVState | None:
        """A saved state, or None (with the reason logged) when it cannot be trusted."""
        if not sha:
            return None
        try:
            # tens of MB mapped and hashed: off the event loop, which streams other nodes.
            # The blob store checks the whole blob against its sha256 name; the map is
            # private, so the import frames the payload in place of the header
            state = await to_thread_to_completion(
                lambda: KVState.from_bytes(self.blobs.map(sha), verify=False, in_place=True)
            )
            state.check_compatible(engine.compat_key)
        except (BlobMissing, BlobCorrupt, StateError) as exc:
            log.warning("not using the %s (%s): recomputing instead", what, exc)
            return None
        return state

    def _cache_key(
        self, node: LlmNode | ForkNode, prompt: list[int], sampling: SamplingParams, engine: Engine
    ) -> str | None:
        deterministic = sampling.temperature == 0 or sampling.seed is not None
        if not node.cache or not deterministic:
            return None
        material = {
            "path": node.path,
            "prompt": prompt,
            "sampling": sampling.model_dump(mode="json"),
            "samples": node.samples if isinstance(node, ForkNode) else 1,
            "model": engine.compat_key.model_sha256,
            "engine": ENGINE_VERSION,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _parse(node: LlmNode | ForkNode, text: str) -> Any:
        if node.output_schema is None:
            return text
        try:
            return json.loads(text)
        except ValueError as exc:
            raise PcrtError(
                f"node {node.id}: the output is not the JSON its schema asks for ({exc}); "
                "raise max_tokens if it was cut short"
            ) from None


def _hints(node: LlmNode | ForkNode) -> tuple[Any, ...] | None:
    """What routes a generating node; None for a fork of branches (it generates nothing)."""
    if isinstance(node, ForkNode) and node.branches is not None:
        return None
    return (node.route, node.complexity, node.model, node.tag)


def _stop_past_budget(run: _Run, tokens: int, *, cut: bool = False) -> None:
    """A node that spent ``tokens`` past the run's token budget, or that the budget cut
    short (``cut``, even as the run's last node), stops the run: its tokens count."""
    limit = run.spec.budget.max_tokens
    if limit is not None and (cut or run.tokens_used + tokens > limit):
        run.tokens_used += tokens
        raise BudgetExceeded("max_tokens", f"{run.tokens_used} of {limit} used")


def _call_hints(node: SubgraphNode) -> tuple[Any, ...] | None:
    """The routing hints a call gives its callee; None when it gives none."""
    if node.route == "auto" and node.complexity is None:
        return None
    return (node.route, node.complexity)


def _ignore(_: DagEvent) -> None:
    return None


def _forwarded(emit: Callable[[DagEvent], None]) -> Callable[[DagEvent], None]:
    """A child run's events for the caller's listeners (they carry the child's run id),
    without its start and end: the calling node's own events bracket them."""

    def forward(event: DagEvent) -> None:
        if event.kind not in ("run_started", "run_finished"):
            emit(event)

    return forward


def _generates(node: Any) -> bool:
    """Whether the node is one generation of its own (a branch fork runs other nodes)."""
    return isinstance(node, LlmNode) or (isinstance(node, ForkNode) and node.branches is None)
