"""Work whose peer fails falls back, and says so (issue 6): an HTTP request whose peer
dies between health checks, recorded in its headers, usage row and metrics (the peer it
falls back to is a pcrt daemon on a fake engine: the forwarding is the subject); and a
DAG node on a peer that hangs (no reset, no answer), handed back within seconds rather
than at its read timeout."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.homes import shared_models_dir
from tests.httpserver import LocalServer
from tests.live_server import LiveServer, ServerFactory
from tests.peering import unique_name, wait_for
from tests.test_peers import (
    _announce,
    _daemon,
    _in_rotation,
    _registry,
    _stop,
    run_breaking_the_peer,
)
from tests.upstream import LlamaCppServer, second_model

MODEL = "smollm2-q8"


@pytest.fixture(scope="module")
def q8_model(default_model_path: Path) -> Path:
    return second_model(default_model_path, shared_models_dir())


def test_a_peer_that_dies_between_checks_hands_the_request_to_the_next(
    tmp_path: Path, live_server: ServerFactory
) -> None:
    listing = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
    registry = _registry(tmp_path / "edge")
    served = f'[models.{MODEL}]\nsource = "{tmp_path / MODEL}.gguf"\ncontext = 512\n'
    cloud = live_server(ServerSettings(), models=served, opener=FakeEngines())
    with LocalServer() as dying:
        dying.add_file("/v1/models", json.dumps(listing).encode(), content_type="application/json")
        # the stronger "a-dead" is tried first for complex work; one health check at
        # start, then none for a minute: its death goes unnoticed until it is used
        static = (
            StaticPeer(name="a-dead", url=dying.url, kind="openai", strength=10),
            StaticPeer(name="cloud", url=cloud.url, kind="openai", strength=1),
        )
        settings = ServerSettings(peers=PeerSettings(static=static, health_interval=60))
        with LiveServer(settings, registry=registry) as edge:
            wait_for(
                lambda: _in_rotation(edge, "a-dead") and _in_rotation(edge, "cloud"),
                15,
                "both static peers are up",
            )
            dying.__exit__(None, None, None)  # its port is closed from here on
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
                "temperature": 0,
            }
            headers = {"X-PC-Complexity": "high", "X-PC-Agent-ID": "fb"}
            reply = httpx.post(
                edge.url + "/v1/chat/completions", json=body, timeout=60, headers=headers
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-pc-ran-on"] == "cloud"
            assert reply.headers["x-pc-fallbacks"] == "a-dead"
            assert not _in_rotation(edge, "a-dead")  # out at once, not at the next check
            metrics = httpx.get(edge.url + "/metrics", timeout=10).text
            bad = httpx.post(
                edge.url + "/v1/chat/completions",
                json=body,
                timeout=10,
                headers={"X-PC-Complexity": "extreme"},
            )
            assert bad.status_code == 400 and "X-PC-Complexity" in bad.json()["error"]["message"]

    with Store(registry.paths.db_path) as store:
        rows = UsageLog(store).rows(agent="fb")
        summary = UsageLog(store).summary(agent="fb")
    assert [r["ran_on"] for r in rows] == ["cloud"]
    fallbacks = json.loads(rows[0]["fallbacks"])
    assert [f["node"] for f in fallbacks] == ["a-dead"]
    assert "ClientConnectorError" in fallbacks[0]["error"]  # what happened, by its name
    assert (summary[0]["on_peers"], summary[0]["fell_back"]) == (1, 1)
    fallback_counts = {
        sample.labels["peer"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "pcrt_peer_fallbacks"
        for sample in family.samples
        if sample.name == "pcrt_peer_fallbacks_total"
    }
    assert fallback_counts == {"a-dead": 1.0}


def test_a_hung_peer_hands_its_node_back_within_seconds(tmp_path: Path, q8_model: Path) -> None:
    key = uuid.uuid4().hex
    box = unique_name("box")
    with LlamaCppServer(q8_model, MODEL) as upstream:
        announcer = _announce(upstream, box, key)
        assert upstream.process is not None
        pid = upstream.process.pid
        try:
            with _daemon(tmp_path, unique_name("edge"), key) as edge:
                wait_for(lambda: _in_rotation(edge, box), 15, "the announced server is trusted")
                # alive and connected, but silent: no reset tells anyone it is gone
                events, fell_back_after = run_breaking_the_peer(
                    edge, box, lambda: os.kill(pid, signal.SIGSTOP), timeout=60
                )
                # health checks: 0.5 s apart, 1 s each, two slow ones forgiven
                assert fell_back_after < 10
                fallback = next(d for k, d in events if k == "fallback")
                assert "stopped answering" in fallback["error"]
                finished = next(d for k, d in events if k == "run_finished")
                assert finished["status"] == "succeeded"
        finally:
            os.kill(pid, signal.SIGCONT)
            _stop(announcer)
