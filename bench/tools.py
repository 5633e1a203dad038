"""Tool calls at full speed, and an agent loop that computes no token twice.

    python -m bench.tools [--threads 2] [--repeats 5] [--out bench/results/tools.json]
    LLAMA_SERVER=/path/to/llama-server python -m bench.tools   # adds llama-server's row

1. A forced call against free decoding of the same length. Through ``pcrt serve`` (one
   slot): a chat request with ``tools`` and ``tool_choice: required`` (the reply
   constrained to the call JSON, each call's arguments to its tool's schema) against a
   request for free text of exactly as many tokens (end tokens banned), with the same
   prompt tokens (the tools' system block sent as a message), greedy. The prompt sits in
   the slot's cache after the first run, so each reply's wall time is its decode. Pairs
   back to back; the ratio is the median pair's. Goal >= 0.95.

2. A 4-step agent: a DAG ``agent`` node (4 steps that each call a tool answering about
   200 tokens, then the answer) against the same loop driven by a client that sends the
   whole conversation each step, through pcrt's OpenAI API and through llama-server
   built from the same llama.cpp (one slot each, same threads). The client replays the
   agent's own conversation (its calls as the call JSON, the same results) and asks each
   step for as many tokens as the agent generated there. Measured: prompt tokens computed
   (not found in a cache) and wall time. Goal: the agent node computes no conversation
   token twice: each step after the first computes only the tokens that are new to it
   (the last generated token, which no one decoded yet, the turn's end, the results and
   the next header).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import run_benchmark
from bench.http import (
    environment,
    free_port,
    session,
    start,
    start_daemon,
    stop,
    until_model_loaded,
)
from pcrt.runtime.engine.call_formats import ToolSpec
from pcrt.runtime.engine.chat import ChatMessage
from pcrt.runtime.engine.tool_prompt import tools_block
from pcrt.runtime.models.pull import ensure_pulled
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.schemas import ToolDefinition
from pcrt.runtime.server.serving.tool_calls import ToolPlan
from pcrt.runtime.sse import aevents

NO_END = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens
PROMPT = "Book flights from Paris to Rome, Oslo to Madrid and Lisbon to Vienna for Ann Lee."
FLIGHT = {
    "type": "object",
    "properties": {
        "origin": {"type": "string", "maxLength": 24},
        "destination": {"type": "string", "maxLength": 24},
        "passenger": {"type": "string", "maxLength": 32},
        "date": {"type": "string", "format": "date"},
        "seat": {"enum": ["aisle", "window", "middle"]},
        "bags": {"type": "integer", "minimum": 0, "maximum": 3},
    },
    "required": ["origin", "destination", "passenger", "date", "seat", "bags"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book one flight.",
            "parameters": FLIGHT,
        },
    }
]


def messages() -> list[dict[str, Any]]:
    """The conversation a forced call renders (the tools' system block first): the free
    requests send exactly these, so both prompts are the same tokens."""
    plan = ToolPlan(tuple(ToolDefinition.model_validate(t) for t in TOOLS), "required", True)
    asked = [ChatMessage(role="user", content=PROMPT)]
    return [{"role": m.role, "content": m.text()} for m in plan.messages(asked)]


async def timed(url: str, model: str, body: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
    """Tokens/s of one whole (not streamed) reply, and its token count. The prompt is the
    same every time and cached in the slot, so the wall time is the decode's."""
    async with session() as client:
        started = time.perf_counter()
        async with client.post(
            url + "/v1/chat/completions", json={"model": model, "temperature": 0, **body}
        ) as r:
            assert r.status == 200, await r.text()
            reply = await r.json()
        wall = time.perf_counter() - started
    tokens = reply["usage"]["completion_tokens"]
    return tokens / wall, tokens, reply["choices"][0]


async def run(threads: int, repeats: int) -> dict[str, Any]:
    results = await forced_call(threads, repeats)
    results["agent"] = await agent_loop(threads)
    return results


async def forced_call(threads: int, repeats: int) -> dict[str, Any]:
    registry = Registry.load()
    model = registry.resolve(None).name
    daemon, url = start_daemon(threads, 1)
    forced = {"messages": [{"role": "user", "content": PROMPT}], "tools": TOOLS}
    forced["tool_choice"] = "required"
    try:
        _, length, choice = await timed(url, model, forced)  # warm; the call's length
        assert choice["finish_reason"] == "tool_calls", choice
        free_body = {"messages": messages(), "max_tokens": length, "logit_bias": NO_END}
        await timed(url, model, free_body)
        free, constrained = [], []
        for _ in range(repeats):
            rate, tokens, _ = await timed(url, model, forced)
            assert tokens == length, (tokens, length)
            constrained.append(rate)
            rate, tokens, _ = await timed(url, model, free_body)
            assert tokens == length, (tokens, length)
            free.append(rate)
    finally:
        stop(daemon)
    ratios = [c / f for c, f in zip(constrained, free, strict=True)]
    return {
        "model": model,
        "threads": threads,
        "call_tokens": length,
        "forced_tok_s": statistics.median(constrained),
        "free_tok_s": statistics.median(free),
        "ratio": statistics.median(ratios),
        "ratio_per_pair": ratios,
        "goal": "ratio >= 0.95",
    }


# -- 2. the agent loop --------------------------------------------------------------------

STEPS = 4  # tool calls, one a step; then the answer
TOPICS = ("lighthouses", "tides", "harbours", "storms", "ships")
AGENT_PROMPT = "Look up lighthouses, tides, harbours and storms, one at a time, then sum up."


def encyclopedia(topic: str) -> str:
    """Read the encyclopedia's entry on a topic (about 200 tokens)."""
    sentence = (
        f"The entry on {topic} describes how people along the coast have lived with "
        f"{topic} for centuries, which records the keepers kept, and what changed when "
        "engines, radio and satellites arrived. "
    )
    return " ".join([sentence] * 6)


AGENT_DAG = {
    "dag": "/dynamic/bench/agent",
    "nodes": {
        "agent": {
            "type": "agent",
            "prompt": AGENT_PROMPT,
            "tools": ["encyclopedia"],
            "tool_choice": "required",
            "reset_tool_choice": False,  # a call every step until max_tool_calls
            "parallel_tool_calls": False,
            "max_steps": STEPS + 1,
            "max_tool_calls": STEPS,
            "temperature": 0,
            "max_tokens": 64,
            "cache": False,
        }
    },
}
ENCYCLOPEDIA = {
    "type": "object",
    "properties": {"topic": {"enum": list(TOPICS)}},
    "required": ["topic"],
}


async def agent_loop(threads: int) -> dict[str, Any]:
    registry = Registry.load()
    entry = registry.resolve(None)
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.toml"
        config.write_text(
            "[[tools.python]]\n"
            'name = "encyclopedia"\n'
            'entry_point = "bench.tools:encyclopedia"\n'
            f"parameters = {_toml(ENCYCLOPEDIA)}\n",
            encoding="utf-8",
        )
        # the daemon imports the tool from this checkout (bench is no installed package)
        root = str(Path(__file__).resolve().parent.parent)
        with environment(PCRT_CONFIG=str(config), PYTHONPATH=root):
            daemon, url = start_daemon(threads, 1)
        try:
            await _warm(url, entry.name, constrained=True)
            node = await _agent_node(url)
        finally:
            stop(daemon)
    daemon, url = start_daemon(threads, 1)  # a cold prompt cache, as the agent's was
    try:
        await _warm(url, entry.name)
        client_pcrt = await _client_loop(url, entry.name, node, openai_history=True)
    finally:
        stop(daemon)
    result: dict[str, Any] = {"agent_node": node, "client_pcrt": client_pcrt}
    server = os.environ.get("LLAMA_SERVER")
    if server:
        gguf = ensure_pulled(entry, registry)
        port = free_port()
        cmd = [server, "-m", str(gguf), "--port", str(port), "-t", str(threads)]
        cmd += ["-c", "2048", "-np", "1", "--jinja"]
        proc = start(cmd, f"http://127.0.0.1:{port}")
        try:
            until_model_loaded(f"http://127.0.0.1:{port}")
            await _warm(f"http://127.0.0.1:{port}", entry.name)
            result["client_llama_server"] = await _client_loop(
                f"http://127.0.0.1:{port}", entry.name, node, openai_history=False
            )
        finally:
            stop(proc)
    return result


async def _agent_node(url: str) -> dict[str, Any]:
    """Run the agent node (streamed, for its steps' numbers); its view and steps."""
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        body = {"dag": AGENT_DAG, "stream": True}
        async with client.stream("POST", url + "/v1/dags", json=body) as r:
            assert r.status_code == 200, await r.aread()
            run_id = r.headers["X-PCRT-Run"]
            async for event in aevents(r.aiter_bytes()):
                if event.event == "tool_calls" and event.data is not None:
                    steps.append(json.loads(event.data))
        wall = time.perf_counter() - started
        view = (await client.get(url + f"/v1/dags/{run_id}")).json()
    assert view["status"] == "succeeded", view
    (record,) = view["nodes"]
    assert len(view["tool_calls"]) == STEPS, view["tool_calls"]
    computed = record["prompt_tokens"] - record["cached_tokens"]
    first = steps[0]["prompt_tokens"]
    return {
        "wall_s": wall,
        "node_s": record["seconds"],
        "prompt_tokens": record["prompt_tokens"],
        "computed_tokens": computed,
        "computed_after_first": computed - first,
        "completion_tokens": record["completion_tokens"],
        "steps": steps,
        "calls": view["tool_calls"],
        "answer_tokens": record["completion_tokens"] - sum(s["completion_tokens"] for s in steps),
    }


async def _client_loop(
    url: str, model: str, node: dict[str, Any], openai_history: bool
) -> dict[str, Any]:
    """The agent's loop as a client drives it: the whole conversation every step, the
    calls as OpenAI messages (``openai_history``) or as the JSON text pcrt writes them
    in (llama-server: SmolLM2's template writes no calls)."""
    spec = ToolSpec("encyclopedia", ENCYCLOPEDIA, encyclopedia.__doc__ or "")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": tools_block([spec], "auto")},
        {"role": "user", "content": AGENT_PROMPT},
    ]
    lengths = [s["completion_tokens"] for s in node["steps"]] + [node["answer_tokens"]]
    computed, prompt, wall = [], [], 0.0
    async with httpx.AsyncClient(timeout=600) as client:
        for step, length in enumerate(lengths):
            body = {
                "model": model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": max(1, length),
                "logit_bias": NO_END,
            }
            started = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body)
            wall += time.perf_counter() - started
            assert r.status_code == 200, r.text
            reply = r.json()
            usage = reply["usage"]
            timings = reply.get("timings") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            done = timings.get("prompt_n")
            if done is None:
                done = usage["prompt_tokens"] - (cached or 0)
            computed.append(int(done))
            prompt.append(int(usage["prompt_tokens"]))
            if step < len(node["calls"]):  # the agent's own call and its result
                call = node["calls"][step]
                result = encyclopedia(**call["arguments"])
                if openai_history:  # as an OpenAI client sends them; pcrt writes the JSON
                    function = {"name": call["tool"], "arguments": json.dumps(call["arguments"])}
                    made = {"id": call["call_id"], "type": "function", "function": function}
                    messages.append({"role": "assistant", "content": None, "tool_calls": [made]})
                    messages.append(
                        {"role": "tool", "content": result, "tool_call_id": call["call_id"]}
                    )
                else:  # the same text, written by the client (no tools in the template)
                    written = {
                        "tool_calls": [{"name": call["tool"], "arguments": call["arguments"]}]
                    }
                    messages.append({"role": "assistant", "content": json.dumps(written)})
                    messages.append({"role": "tool", "content": result})
    return {
        "wall_s": wall,
        "prompt_tokens": sum(prompt),
        "computed_tokens": sum(computed),
        "computed_after_first": sum(computed) - computed[0],
        "per_step": computed,
    }


async def _warm(url: str, model: str, constrained: bool = False) -> None:
    """The model loaded (and, ``constrained``, the grammar tokenizer built: once per
    model), on a prompt that shares nothing with the agent's but the template's start."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello there."}],
        "max_tokens": 4,
    }
    if constrained:
        body["response_format"] = {"type": "json_object"}
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text


def _toml(value: dict[str, Any]) -> str:
    """A JSON object as a TOML inline table (JSON's strings and arrays are TOML's)."""
    inner = ", ".join(
        f"{key} = {_toml(v) if isinstance(v, dict) else json.dumps(v)}" for key, v in value.items()
    )
    return "{ " + inner + " }"


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    table = [
        (
            f"forced call, {r['call_tokens']} tokens, HTTP",
            f"{r['forced_tok_s']:.1f} tok/s (tool call)",
            f"{r['free_tok_s']:.1f} tok/s (free)",
            f"{r['ratio']:.3f} (>= 0.95)",
        )
    ]
    agent = r["agent"]
    node = agent["agent_node"]
    for name in ("client_pcrt", "client_llama_server"):
        client = agent.get(name)
        if client is None:
            continue
        table.append(
            (
                f"{STEPS}-step agent, computed after step 1 ({name})",
                f"{node['computed_after_first']} tokens, {node['node_s']:.2f} s (agent node)",
                f"{client['computed_after_first']} tokens, {client['wall_s']:.2f} s",
                "no conversation token twice",
            )
        )
    return table


if __name__ == "__main__":
    run_benchmark(__doc__ or "", "tools", run, rows, repeats=5)
