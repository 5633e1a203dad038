"""Work routed to peers, end to end on loopback: the ``X-PC-Route`` header between two
pcrt daemons (the answer, its ``X-PC-Ran-On``, both daemons' usage rows, streamed or not;
on fake engines, since the routing and its accounting are the subject), and DAG nodes
routed by tag and by model to a pcrt daemon configured as a static OpenAI-compatible peer
(on the real model: JSON schema output, token counts from the stream's usage chunk)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import ServerFactory
from tests.peering import unique_name, wait_for
from tests.test_peers import _daemon, _events, _in_rotation

MODEL = "smollm2-135m"
CHAT = "/v1/chat/completions"


def _loaded(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(url + "/v1/pcrt/ps", timeout=5).json()["models"]]


def _sse(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_route_peer_runs_the_request_on_the_pcrt_peer_and_local_keeps_it(
    tmp_path: Path,
) -> None:
    key = uuid.uuid4().hex
    a_name, b_name = unique_name("a"), unique_name("b")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with (
        _daemon(tmp_path, a_name, key, opener=FakeEngines()) as a,
        _daemon(tmp_path, b_name, key, opener=FakeEngines()) as b,
    ):
        wait_for(lambda: _in_rotation(a, b_name), 10, "a trusts b")

        # not streamed: b answers, a's row says so with b's counts
        agent = unique_name("plain")
        reply = httpx.post(
            a.url + CHAT,
            json=body,
            timeout=60,
            headers={"X-PC-Route": "peer", "X-PC-Agent-ID": agent},
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-pc-ran-on"] == b_name
        usage = reply.json()["usage"]
        assert usage["completion_tokens"] > 0
        wait_for(lambda: len(a.usage_rows(agent)) == 1, 5, "a's usage row")
        (on_b,) = b.usage_rows(agent)  # the agent header went along
        assert on_b["ran_on"] == "local" and on_b["status"] == 200 and on_b["model"] == MODEL
        assert on_b["completion_tokens"] == usage["completion_tokens"]
        assert on_b["prompt_tokens"] == usage["prompt_tokens"]
        (on_a,) = a.usage_rows(agent)
        assert on_a["ran_on"] == b_name and on_a["status"] == 200
        assert on_a["completion_tokens"] == usage["completion_tokens"]
        assert on_a["prompt_tokens"] == usage["prompt_tokens"]
        assert _loaded(a.url) == [] and _loaded(b.url) == [MODEL]  # a generated nothing
        direct = httpx.post(
            b.url + CHAT, json=body, headers={"X-PC-Route": "local"}, timeout=60
        ).json()
        content = direct["choices"][0]["message"]["content"]
        assert reply.json()["choices"][0]["message"]["content"] == content

        # streamed, with and without the client asking for the usage chunk
        for wants_usage in (False, True):
            agent = unique_name(f"stream-{wants_usage}")
            streamed = {**body, "stream": True}
            if wants_usage:
                streamed["stream_options"] = {"include_usage": True}
            headers = {"X-PC-Route": "peer", "X-PC-Agent-ID": agent}
            with httpx.stream(
                "POST", a.url + CHAT, json=streamed, headers=headers, timeout=60
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-pc-ran-on"] == b_name
                lines = [line for line in response.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            chunks = _sse(lines)
            text = "".join(c["delta"].get("content") or "" for e in chunks for c in e["choices"])
            assert text == content
            usages = [e["usage"] for e in chunks if e.get("usage")]
            wait_for(lambda: len(a.usage_rows(agent)) == 1, 5, "a's row for the stream")  # noqa: B023
            (on_b,) = b.usage_rows(agent)
            (on_a,) = a.usage_rows(agent)
            assert on_b["ran_on"] == "local" and on_a["ran_on"] == b_name
            assert on_a["status"] == on_b["status"] == 200
            assert on_a["completion_tokens"] == on_b["completion_tokens"] > 0
            assert on_a["prompt_tokens"] == on_b["prompt_tokens"] > 0
            if wants_usage:
                assert usages == [usages[-1]] and chunks[-1]["usage"] == usages[-1]
                assert usages[-1]["completion_tokens"] == on_b["completion_tokens"]
            else:
                assert usages == []  # a asked b for it; its client did not
        assert _loaded(a.url) == []

        # local: the same request stays on a
        agent = unique_name("local")
        here = httpx.post(
            a.url + CHAT,
            json=body,
            timeout=60,
            headers={"X-PC-Route": "local", "X-PC-Agent-ID": agent},
        )
        assert here.status_code == 200 and "x-pc-ran-on" not in here.headers
        assert here.json()["choices"][0]["message"]["content"] == content
        (on_a,) = a.usage_rows(agent)
        assert on_a["ran_on"] == "local"
        assert on_a["completion_tokens"] == here.json()["usage"]["completion_tokens"]
        assert b.usage_rows(agent) == []
        assert _loaded(a.url) == [MODEL]


# the model answers this in kana, whose characters split over several tokens: it streams
# fewer text pieces than it generates tokens, so only the usage chunk gives the count
KANA_PROMPT = "Translate 'thank you' into Japanese (in kana) and give it as JSON."
KANA = {
    "type": "object",
    # bounded, as a schema for a small model should be (unbounded, greedy 135M writes one
    # string until max_tokens)
    "properties": {
        "japanese": {"type": "string", "maxLength": 8},
        "english": {"type": "string", "maxLength": 24},
    },
    "required": ["japanese", "english"],
}


def test_dag_nodes_on_a_static_openai_peer_use_json_schema_and_its_usage_chunk(
    default_model_path: Path, live_server: ServerFactory
) -> None:
    """A pcrt daemon configured as a static peer of kind "openai": it takes the node with
    tag "complex" (its tags) and the node naming a model only it lists. The schema node's
    output validates, and its token count is the one the peer logged, read from the
    stream's usage chunk: more than the text pieces it streamed."""
    big = f'[models.smol-big]\nsource = "{default_model_path}"\ncontext = 1024\n'
    strong = live_server(ServerSettings(parallel=2, context=1024), models=big)
    peer = StaticPeer(
        name="strong", url=strong.url, kind="openai", models=("smol-big",), tags=("complex",)
    )
    settings = ServerSettings(peers=PeerSettings(static=(peer,), health_interval=0.5))
    edge = live_server(settings)
    wait_for(lambda: _in_rotation(edge, "strong"), 10, "the static peer is up")
    dag = {
        "dag": "/dynamic/kana",
        "nodes": {
            "kana": {
                "type": "llm",
                "tag": "complex",
                "prompt": KANA_PROMPT,
                "temperature": 0,
                "max_tokens": 48,
                "output_schema": KANA,
            },
            "named": {
                "type": "llm",
                "model": "smol-big",
                "temperature": 0,
                "max_tokens": 8,
                "prompt": "Say {{ nodes.kana.output.english }}.",
            },
        },
    }
    pieces = {"kana": 0, "named": 0}
    body = {"dag": dag, "stream": True}
    agent = unique_name("kana-agent")
    with httpx.stream(
        "POST",
        edge.url + "/v1/dags",
        json=body,
        timeout=120,
        headers={"X-PC-Agent-ID": agent},
    ) as response:
        run_id = response.headers["x-pcrt-run"]
        for kind, data in _events(response.iter_lines()):
            if kind == "token":
                pieces[data["node"]] += 1
    run = httpx.get(f"{edge.url}/v1/dags/{run_id}", timeout=10).json()
    assert run["status"] == "succeeded", run["error"]
    nodes = {n["node_id"]: n for n in run["nodes"]}
    jsonschema.validate(run["outputs"]["kana"], KANA)
    for node_id in ("kana", "named"):
        assert nodes[node_id]["ran_on"] == "strong", node_id
        assert nodes[node_id]["model"] == "smol-big"
        assert "strong" in nodes[node_id]["routing"]["reason"]
    # one request per node on the peer, in order (named waits for kana)
    rows = strong.services.usage.rows()
    assert [(r["route"], r["model"], r["status"]) for r in rows] == [
        (CHAT, "smol-big", 200),
        (CHAT, "smol-big", 200),
    ]
    billed = edge.services.usage.rows(agent=agent)  # the edge bills the same agent
    for row, here, node_id in zip(rows, billed, ("kana", "named"), strict=True):
        assert nodes[node_id]["completion_tokens"] == row["completion_tokens"] > 0
        assert nodes[node_id]["prompt_tokens"] == row["prompt_tokens"] > 0
        assert row["agent"] == agent  # sent as OpenAI's "user"
        assert (here["request_id"], here["ran_on"]) == (f"{run_id}/{node_id}", "strong")
        assert here["completion_tokens"] == row["completion_tokens"]
    assert pieces["kana"] < nodes["kana"]["completion_tokens"]  # not chunks counted
    # the peer took OpenAI's form of the schema at once, and it is remembered
    remote = vars(edge.services.dags.runner.remote)
    assert remote["_schema_form"] == {"strong": "json_schema"}
    assert _loaded(edge.url) == []  # nothing ran on the edge
