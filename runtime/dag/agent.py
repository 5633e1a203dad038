"""An ``agent`` node: a model with tools in a loop, on an engine here.

Each step generates with the node's tools offered in the model's own call format (the
call grammar from ``call_formats``: forced on the first step when ``tool_choice`` says
so, lazy otherwise). A reply without calls is the answer; a reply with calls has them
run at once (``tools.run_calls``: each recorded before it is sent, its result before
the model reads it), and the results join the conversation for the next step.

The conversation's KV stays with the node: each step exports its sequence's state, and
the next step's prompt is exactly those tokens plus the new ones, the end of the
assistant's turn, the results and the next turn's header, as the template writes them
(found by rendering the conversation with and without them). The engine restores the
state (or finds it still in its slot) and computes only the new tokens. A template that
rewrites earlier turns when new ones follow (some reasoning templates drop old
thoughts) is rendered whole instead, and the engine reuses what still matches.

A resumed node replays the steps whose calls are recorded without generating them
again: the calls come from their records (their results too, or they are settled as
``tools.run_calls`` says), and generation resumes at the first step with none.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pcrt.cache.runs import NodeFinished, NodeStarted
from pcrt.cache.store import utc_now
from pcrt.runtime.dag.context import RunContext
from pcrt.runtime.dag.events import DagEvent, DagEventKind
from pcrt.runtime.dag.spec import AgentNode
from pcrt.runtime.dag.template_render import render_async
from pcrt.runtime.dag.tools import PlannedCall, run_calls
from pcrt.runtime.engine import EngineClient, GenerateRequest, TokenEvent
from pcrt.runtime.engine.call_formats import CallFormat, ToolSpec, call_grammar, read_reply
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.constraints import constraint_of
from pcrt.runtime.engine.sampling import SamplingParams
from pcrt.runtime.engine.state import KVState
from pcrt.runtime.engine.tool_prompt import template_tools, tool_messages
from pcrt.runtime.errors import ConstraintInvalid, PcrtError
from pcrt.runtime.threads import to_thread_to_completion
from pcrt.runtime.tools import ToolResult

__all__ = ["run_agent"]

_SENTINEL = "\x00pcrt-turn-end\x00"
MAX_CALLS_A_STEP = 8  # as the OpenAI API's replies (serving.tool_calls.MAX_PARALLEL_CALLS)


@dataclass
class _Spent:
    prompt: int = 0  # prompt tokens the steps' generations ran on
    computed: int = 0  # of those, computed (not found in the KV)
    completion: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)


async def run_agent(run: RunContext, node: AgentNode, scope: dict[str, Any]) -> str:
    """The agent's answer: the text of its first reply that calls no tool."""
    deps = run.deps
    registry = deps.tools
    if registry is None:
        raise PcrtError(f"node {node.id}: no tools are registered here (see [tools])")
    tools = [registry.get(name) for name in node.tools]
    specs = [ToolSpec(t.name, t.parameters, t.description) for t in tools]
    for spec in specs:  # an MCP server's schema is held to the bounds of any other
        try:
            constraint_of(spec.schema, None)
        except ConstraintInvalid as exc:
            raise PcrtError(f"node {node.id}: tool {spec.name!r}'s parameters: {exc}") from None
    entry = deps.registry.resolve(node.model or node.tag)
    record = await deps.runs.node(run.id, node.id)
    recorded = await deps.calls.of_run(run.id)
    steps_done: dict[int, list[PlannedCall]] = {}
    for call in (c for c in recorded if c.node_id == node.id):
        steps_done.setdefault(call.step, []).append(
            PlannedCall(call.call_id, call.tool, call.arguments)
        )
    started = time.perf_counter()
    spent = _Spent()
    async with deps.lease(entry.name) as engine:
        # found by rendering the template the first time: off the loop
        fmt, roles = await to_thread_to_completion(
            lambda: (engine.chat.call_format, engine.chat.roles)
        )
        chat = _Conversation(engine, fmt, specs, roles)
        chat.messages = await _opening(run, node, scope)
        await deps.runs.update_node(
            run.id,
            node.id,
            NodeStarted(
                ran_on=deps.ran_on, started_at=record.started_at or utc_now(), model=engine.name
            ),
        )
        made = 0  # calls of the steps so far, replayed ones included
        for step in range(node.max_steps):
            planned = steps_done.get(step)
            content: str | None = None
            generated = planned is None
            if planned is None:  # not recorded: generate it
                reset = step > 0 and node.reset_tool_choice
                choice = "auto" if reset else node.tool_choice  # reset after a call
                left = None if node.max_tool_calls is None else node.max_tool_calls - made
                if left is not None and left <= 0:
                    choice = "none"  # its calls are spent: it answers with what it has
                text, content, calls = await _generate(run, node, chat, choice, step, spent, left)
                if not calls:
                    return await _finish(run, node, engine, text, spent, started)
                planned = [  # the id the model wrote, when it writes one: it is in the KV
                    PlannedCall(call_id or chat.fmt.call_id(), name, json.loads(arguments))
                    for name, arguments, call_id in calls
                ]
            else:
                chat.forget_kv()  # the KV of a step before the crash is gone
            results = await run_calls(run, node.id, step, planned)
            made += len(planned)
            await chat.add_step(content, planned, results)
            settled = [
                {"tool": c.tool, "ok": r.ok, "seconds": r.seconds}
                for c, r in zip(planned, results, strict=True)
            ]
            data: dict[str, Any] = {"step": step, "calls": settled}
            if generated:  # the step's own numbers: prompt, computed, completion tokens
                data.update(spent.steps[-1])
            run.emit(DagEvent(DagEventKind.TOOL_CALLS, run.id, node.id, data))
    raise PcrtError(
        f"node {node.id}: the agent was still calling tools after max_steps "
        f"({node.max_steps}) generations; raise max_steps or narrow the task"
    )


async def _opening(run: RunContext, node: AgentNode, scope: dict[str, Any]) -> list[ChatMessage]:
    env = run.deps.env
    messages = []
    if node.system is not None:
        system = await render_async(env, node.system, scope, node=node.id)
        messages.append(ChatMessage(role="system", content=system))
    prompt = await render_async(env, node.prompt, scope, node=node.id)
    return [*messages, ChatMessage(role="user", content=prompt)]


async def _generate(
    run: RunContext,
    node: AgentNode,
    chat: _Conversation,
    choice: str,
    step: int,
    spent: _Spent,
    left: int | None,
) -> tuple[str, str, list[tuple[str, str, str | None]]]:
    """One step's reply: its text, the text before its calls, and its whole calls as
    (name, JSON arguments, the id the model wrote if any). ``left``: the calls the node
    may still make (None: any)."""
    engine = chat.engine
    params = dict(node.sampling())
    budget = await run.tokens_left()
    if budget is not None:  # the run's counters have none of this node's steps yet
        budget -= spent.completion
        params["max_tokens"] = max(1, min(params.get("max_tokens", budget), budget))
    if choice == "none":  # tools withheld: the reply is the answer, unconstrained
        sampling = SamplingParams(**params)
    else:
        most = MAX_CALLS_A_STEP if node.parallel_tool_calls else 1
        if choice not in ("auto", "required"):
            most = 1  # a named tool is called once
        most = most if left is None else max(1, min(most, left))
        allowed = [t for t in chat.specs if choice in ("auto", "required", t.name)]
        grammar = call_grammar(
            chat.fmt,
            allowed,
            lazy=choice == "auto",
            most=most,
            special=engine.model.special_token,
        )
        sampling = SamplingParams(
            **params,
            grammar=grammar,
            grammar_triggers=chat.fmt.triggers if choice == "auto" else (),
            anchored_triggers=chat.fmt.anchored if choice == "auto" else (),
            shown_specials=chat.fmt.markers,
        )
    request = chat.request(sampling)
    handle = engine.submit(request, await engine.prepare_in_thread(request))
    async for event in handle:
        if isinstance(event, TokenEvent) and event.text:
            data = {"index": 0, "text": event.text, "step": step}
            run.emit(DagEvent(DagEventKind.TOKEN, run.id, node.id, data))
    result = handle.result
    assert result is not None
    choice_ = result.choices[0]
    spent.prompt += result.prompt_tokens
    spent.computed += result.prompt_tokens - result.cached_tokens
    spent.completion += result.completion_tokens
    spent.steps.append(
        {
            "step": step,
            "prompt_tokens": result.prompt_tokens,
            "computed_tokens": result.prompt_tokens - result.cached_tokens,
            "completion_tokens": result.completion_tokens,
        }
    )
    chat.generated(choice_.state)
    if choice == "none":
        return choice_.text, choice_.text, []
    reply = read_reply(chat.fmt, choice_.text, chat.specs)
    whole = [c for c in reply.calls if c.complete]
    if len(whole) < len(reply.calls):  # cut by max_tokens inside a call: never sent
        if not whole:
            raise PcrtError(
                f"node {node.id}: max_tokens ran out inside a tool call at step {step}; "
                "raise max_tokens"
            )
        chat.rewritten()  # the KV holds the unfinished call: the template writes it anew
    return choice_.text, reply.content, [(c.name, c.arguments, c.call_id) for c in whole]


async def _finish(
    run: RunContext,
    node: AgentNode,
    engine: EngineClient,
    text: str,
    spent: _Spent,
    started: float,
) -> str:
    finished = NodeFinished(
        output=text,
        ran_on=run.deps.ran_on,
        spent_tokens=spent.completion,
        model=engine.name,
        prompt_tokens=spent.prompt,
        completion_tokens=spent.completion,
        cached_tokens=spent.prompt - spent.computed,
        seconds=time.perf_counter() - started,
    )
    totals = await run.deps.runs.finish_node(run.id, node.id, finished)
    await run.bill(node.id)
    run.stop_past_budget(totals)
    return text


class _Conversation:
    """The agent's conversation, as messages and, once a step ran, as the exact tokens
    whose KV the engine holds for it."""

    def __init__(
        self,
        engine: EngineClient,
        fmt: CallFormat,
        specs: list[ToolSpec],
        roles: frozenset[str],
    ) -> None:
        self.engine = engine
        self.fmt = fmt
        self.specs = specs
        self.roles = roles  # besides user and assistant, the ones its template writes
        self.messages: list[ChatMessage] = []
        self._state: KVState | None = None  # after the last step's reply
        self._next: list[int] | None = None  # its tokens and the results' after them
        self._rewritten = False  # the last reply is not what the template would write

    def request(self, sampling: SamplingParams) -> GenerateRequest:
        if self._next is not None and self._state is not None:
            return GenerateRequest(
                prompt=self._next, context_state=self._state, sampling=sampling, export_state=True
            )
        return GenerateRequest(
            messages=self._shown(self.messages),
            tools=template_tools(self.fmt, self.specs),
            sampling=sampling,
            export_state=True,
            context_state=self._state,  # a template that rewrote: reuse what still matches
        )

    def generated(self, state: KVState | None) -> None:
        self._state = state

    def forget_kv(self) -> None:
        self._state, self._next = None, None

    def rewritten(self) -> None:
        """The next prompt is the conversation rendered whole; the engine reuses what of
        the last state still matches it."""
        self._rewritten = True

    async def add_step(
        self, content: str | None, planned: list[PlannedCall], results: list[ToolResult]
    ) -> None:
        """The assistant's calls and their results join the conversation; the next
        prompt is the KV's tokens and what the template writes after them."""
        calls = [
            {
                "id": c.call_id,
                "type": "function",
                "function": {"name": c.tool, "arguments": json.dumps(c.arguments)},
            }
            for c in planned
        ]
        assistant = ChatMessage.model_validate(
            {"role": "assistant", "content": content or None, "tool_calls": calls}
        )
        answers = [
            ChatMessage.model_validate(
                {"role": "tool", "content": r.text, "tool_call_id": c.call_id, "name": c.tool}
            )
            for c, r in zip(planned, results, strict=True)
        ]
        before = [*self.messages, assistant]
        self.messages = [*before, *answers]
        whole = self._rewritten or self._state is None
        # three template renders and a tokenize: milliseconds, off the loop
        self._next = None if whole else await to_thread_to_completion(self._continued, before)
        self._rewritten = False

    def _shown(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        # "auto" always: the generic block must not change between steps (its KV stays)
        return tool_messages(self.fmt, self.specs, "auto", messages, self.roles)

    def _continued(self, before: list[ChatMessage]) -> list[int] | None:
        """The KV's tokens and the tokens that follow them: the end of the assistant's
        turn, the results, the next turn's header. None when the template does not
        write the conversation so that those follow (then it is rendered whole)."""
        assert self._state is not None
        chat, model = self.engine.chat, self.engine.model
        tools = list(template_tools(self.fmt, self.specs) or ()) or None
        try:
            whole = chat.render(self._shown(self.messages), tools)
            upto = chat.render(self._shown(before), tools, generation_prompt=False)
            opened = [*before[:-1], ChatMessage(role="assistant", content=_SENTINEL)]
            marked = chat.render(self._shown(opened), tools, generation_prompt=False)
        except PcrtError:
            return None
        if not whole.startswith(upto) or _SENTINEL not in marked:
            return None
        closing = marked[marked.rindex(_SENTINEL) + len(_SENTINEL) :]
        tokens = list(self._state.continuation)
        after = model.tokenize(closing + whole[len(upto) :], add_special=False, parse_special=True)
        if after[:1] == tokens[-1:] and not model.detokenize(tokens[-1:]):
            after = after[1:]  # the reply ended with the turn's end token: it is in the KV
        return tokens + after
