"""An HTTP request whose peer fails before answering falls back, and says so: in the
response headers, the usage row and the metrics (issue 6: "failures and fallbacks are
recorded")."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.runtime.settings import PeerSettings, ServerSettings, StaticPeer
from tests.conftest import shared_models_dir
from tests.httpserver import LocalServer
from tests.live_server import LiveServer
from tests.test_peers import _in_rotation, _registry, _wait_for
from tests.upstream import LlamaCppServer, second_model

MODEL = "smollm2-q8"


@pytest.fixture(scope="module")
def q8_model(default_model_path: Path) -> Path:
    return second_model(default_model_path, shared_models_dir())


def test_a_peer_that_dies_between_checks_hands_the_request_to_the_next(
    tmp_path: Path, q8_model: Path
) -> None:
    listing = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
    registry = _registry(tmp_path / "edge")
    with LlamaCppServer(q8_model, MODEL) as cloud, LocalServer() as dying:
        dying.add_file("/v1/models", json.dumps(listing).encode(),
                       content_type="application/json")  # fmt: skip
        # "a-dead" sorts first among equals, so it is tried before "cloud"; one health
        # check at start, then none for a minute: its death goes unnoticed until used
        static = (
            StaticPeer(name="a-dead", url=dying.url, kind="openai"),
            StaticPeer(name="cloud", url=cloud.url, kind="openai"),
        )
        settings = ServerSettings(peers=PeerSettings(static=static, health_interval=60))
        with LiveServer(settings, registry=registry) as edge:
            _wait_for(lambda: _in_rotation(edge, "a-dead") and _in_rotation(edge, "cloud"),
                      15, "both static peers are up")  # fmt: skip
            dying.__exit__(None, None, None)  # its port is closed from here on
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 4, "temperature": 0}  # fmt: skip
            reply = httpx.post(edge.url + "/v1/chat/completions", json=body, timeout=60,
                               headers={"X-PC-Route": "peer", "X-PC-Agent-ID": "fb"})  # fmt: skip
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-pc-ran-on"] == "cloud"
            assert reply.headers["x-pc-fallbacks"] == "a-dead"
            assert not _in_rotation(edge, "a-dead")  # out at once, not at the next check
            metrics = httpx.get(edge.url + "/metrics", timeout=10).text

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
