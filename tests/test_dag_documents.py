"""Over HTTP a DAG is a document, never a path (issue 16, item 7): ``{"dag": "{x.JSON"}``
once ran ``./{x.JSON`` from the daemon's working directory, and a missing file's errno
came back, which let a caller probe for files. Only the CLI reads DAG files.

On the fake engine (``tests/fakes.py``): the DAGs here assert, they never generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from bench.stall import chained_dag
from pcrt.runtime.dag.load import looks_like_file_name, parse_dag_text
from pcrt.runtime.errors import DagInvalid
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.health_probe import HealthProbe
from tests.live_server import ServerFactory

DOC = {"dag": "/dynamic/from_a_file", "nodes": {"a": {"type": "assert", "that": "true"}}}


def _files(folder: Path) -> list[str]:
    """Valid DAG files in ``folder``, named as a caller would guess them."""
    (folder / "{x.JSON").write_text(json.dumps(DOC))
    (folder / "plan.yaml").write_text(yaml.safe_dump(DOC))
    (folder / "plan.toml").write_text('dag = "/dynamic/from_a_file"\n[nodes.a]\ntype = "assert"\n')
    return ["{x.JSON", "plan.yaml", "plan.toml"]


def test_a_file_name_is_refused_without_reading_the_file(
    live_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the daemon runs in this process: its working directory
    server = live_server(ServerSettings(), opener=FakeEngines())
    existing = _files(tmp_path)
    missing = ["{y.JSON", "nowhere.yaml", " /etc/pcrt-no-such-file.yml "]
    answers = {}
    for name in existing + missing:
        r = httpx.post(server.url + "/v1/dags", json={"dag": name}, timeout=30)
        assert r.status_code == 400, (name, r.text)
        message = r.json()["error"]["message"]
        assert "send the DAG document itself" in message, (name, message)
        assert "Errno" not in message and "No such file" not in message
        answers[name] = message
    # the answer is the same whether the file is there or not: nothing to probe
    assert len(set(answers.values())) == 1, answers
    assert server.services.dags.runner.runs.list_runs() == []  # no file's DAG ran
    # the document itself runs
    r = httpx.post(server.url + "/v1/dags", json={"dag": json.dumps(DOC)}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text


def test_the_text_entry_parses_what_it_is_given_and_never_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in _files(tmp_path):
        assert looks_like_file_name(name)
        with pytest.raises(DagInvalid) as caught:
            parse_dag_text(name)  # the name is parsed as the document it is
        text = str(caught.value.to_list())
        assert "cannot read" not in text and "from_a_file" not in text, text
    with pytest.raises(DagInvalid, match="a mapping, not str"):
        parse_dag_text(str(tmp_path / "plan.yaml"))
    assert parse_dag_text(json.dumps(DOC)).dag == "/dynamic/from_a_file"
    assert parse_dag_text(yaml.safe_dump(DOC)).dag == "/dynamic/from_a_file"
    assert not looks_like_file_name(yaml.safe_dump(DOC))


@pytest.mark.parametrize("as_text", [False, True])
def test_a_2_mb_document_is_parsed_and_checked_off_the_loop(
    live_server: ServerFactory, as_text: bool
) -> None:
    """1,000 chained nodes of 2,000 characters: YAML-parsing the text took 0.7 s and
    checking the DAG (every template scanned) 1.3 s, on the loop, before the run began."""
    server = live_server(ServerSettings(), opener=FakeEngines())
    doc = chained_dag(nodes=1000, padding=2000)
    body = {"dag": yaml.safe_dump(doc) if as_text else doc, "wait": False}
    with HealthProbe(server.url) as probe:
        reply = httpx.post(server.url + "/v1/dags", json=body, timeout=120)
    assert reply.status_code == 202, reply.text
    httpx.delete(f"{server.url}/v1/dags/{reply.json()['id']}", timeout=30)
    print(probe.report("1,000 nodes"))
    assert probe.failures == [] and probe.worst < 0.5, probe.report("1,000 nodes")
