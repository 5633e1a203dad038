"""``pcrt dag run | list | status | resume | cancel`` in-process, on the real default model.

PCRT_URL points at a dead port (conftest), so every command takes the local path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from pcrt.cache.runs import RunStore
from pcrt.cache.store import Store
from pcrt.cli.dag import parse_inputs
from pcrt.cli.main import main
from pcrt.runtime.dag import parse_dag
from pcrt.runtime.errors import PcrtError
from pcrt.runtime.paths import Paths

EXAMPLE = Path(__file__).parent.parent / "examples" / "dags" / "summary_titles.yaml"

SMALL = {
    "dag": "/dynamic/small",
    "inputs": {"topic": {"type": "string"}, "n": {"type": "integer", "default": 1}},
    "nodes": {
        "fact": {
            "type": "llm",
            "tag": "simple",
            "temperature": 0,
            "max_tokens": 8,
            "cache": False,
            "prompt": "Say one fact about {{ inputs.topic }}.",
        },
        "check": {"type": "assert", "that": "inputs.n == 3 and nodes.fact.output | length > 0"},
    },
}


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_dag(path: Path, document: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_inputs_are_json_or_text_and_files_are_read(tmp_path: Path) -> None:
    spec = parse_dag({**SMALL, "inputs": {"year": {"type": "string"}, "n": {"type": "integer"}}})
    (tmp_path / "tags.json").write_text('["a", "b"]\n')
    values = parse_inputs(
        ["n=3", "year=1999", "text=hello world", f"tags=@{tmp_path / 'tags.json'}", "e="],
        spec,
    )
    # a declared string keeps the text as typed; everything else is JSON when it parses
    assert values == {"n": 3, "year": "1999", "text": "hello world", "tags": ["a", "b"], "e": ""}
    bad = pcrt("dag", "run", str(EXAMPLE), "-i", "no-equals-sign")
    assert bad.exit_code == 2 and "expected key=value" in bad.stderr


def test_example_runs_and_shows_in_list_and_status(default_model_path: Path) -> None:
    result = pcrt("dag", "run", str(EXAMPLE), "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["status"] == "succeeded", view["error"]
    assert len(view["outputs"]["titles"]) == 3 and all(view["outputs"]["titles"])
    assert view["outputs"]["summary"].strip() and view["outputs"]["check"] is True
    assert {n["node_id"]: n["ran_on"] for n in view["nodes"]}["summary"] == "local"
    run_id = view["id"]

    counted = json.loads(pcrt("usage", "--json").stdout)  # a run here is counted too
    assert (
        sum(r["completion_tokens"] for r in counted)
        >= sum(n.get("completion_tokens") or 0 for n in view["nodes"])
        > 0
    )

    listed = pcrt("dag", "list")
    assert run_id in listed.stdout and "succeeded" in listed.stdout and "3/3" in listed.stdout
    [row] = json.loads(pcrt("dag", "list", "--json").stdout)
    assert (row["id"], row["status"], row["nodes_done"]) == (run_id, "succeeded", 3)
    assert "no DAG runs with status failed" in pcrt("dag", "list", "--status", "failed").stdout

    status = pcrt("dag", "status", run_id)
    assert status.exit_code == 0, status.output
    for text in ("summary", "titles", "check", "tokens: prompt", "ran on: local", "after:"):
        assert text in status.stdout
    assert view["outputs"]["titles"][0] in status.stdout  # the outputs follow the tree
    as_json = json.loads(pcrt("dag", "status", run_id, "--json").stdout)
    assert as_json["id"] == run_id and as_json["outputs"] == view["outputs"]
    # the first characters of the id name it, as git and Docker take them
    short = json.loads(pcrt("dag", "status", run_id[:8], "--json").stdout)
    assert short["id"] == run_id

    # the same deterministic nodes again: the subgraph cache answers, --follow shows it
    again = pcrt("dag", "run", str(EXAMPLE), "--follow")
    assert again.exit_code == 0, again.output
    assert "→ summary (llm)" in again.stdout and "✓ titles" in again.stdout
    assert "cache hit" in again.stdout and ": succeeded" in again.stdout
    assert view["outputs"]["summary"].strip() in again.stdout


def test_inputs_override_then_cancel_and_resume(
    default_model_path: Path, tmp_path: Path, pcrt_env: Paths
) -> None:
    file = write_dag(tmp_path / "small.yaml", SMALL)
    (tmp_path / "topic.txt").write_text("owls")
    result = pcrt(
        "dag", "run", str(file), "-i", f"topic=@{tmp_path / 'topic.txt'}", "-i", "n=3", "--json"
    )
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["status"] == "succeeded" and view["inputs"] == {"topic": "owls", "n": 3}
    run_id, fact = view["id"], view["outputs"]["fact"]

    with Store(pcrt_env.db_path) as store:  # as if a daemon died in the middle of `fact`
        runs = RunStore(store)
        runs.patch_node(run_id, "fact", status="interrupted", output=None)
        runs.patch_node(run_id, "check", status="pending", output=None)
        runs.set_status(run_id, "interrupted")
    cancelled = pcrt("dag", "cancel", run_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    with Store(pcrt_env.db_path) as store:
        assert RunStore(store).get_run(run_id).status == "cancelled"
    shown = pcrt("dag", "status", run_id)
    assert "cancelled" in shown.stdout and "interrupted" in shown.stdout

    resumed = pcrt("dag", "resume", run_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    after = json.loads(resumed.stdout)
    assert after["status"] == "succeeded" and after["outputs"]["fact"] == fact  # greedy
    again = pcrt("dag", "resume", run_id)
    assert again.exit_code == 1 and "is succeeded" in again.stderr

    failing = pcrt("dag", "run", str(file), "-i", "topic=owls")  # n defaults to 1: check fails
    assert failing.exit_code == 1
    assert "failed" in failing.stderr and "inputs.n == 3" in failing.stderr


def test_a_run_left_running_without_a_daemon_is_cancelled(pcrt_env: Paths) -> None:
    spec = parse_dag(SMALL)
    with Store(pcrt_env.db_path) as store:
        runs = RunStore(store)
        nodes = [(node_id, node.path, node.type) for node_id, node in spec.nodes.items()]
        runs.create_run("deadbeef0001", spec.dag, spec.document(), {"topic": "x"}, nodes)
        runs.patch_node("deadbeef0001", "fact", status="running")
        runs.set_status("deadbeef0001", "running")
    result = pcrt("dag", "cancel", "deadbeef0001")
    assert result.exit_code == 0
    assert "no daemon answers" in result.stdout and "cancelled" in result.stdout
    with Store(pcrt_env.db_path) as store:
        runs = RunStore(store)
        assert runs.get_run("deadbeef0001").status == "cancelled"
        assert runs.node("deadbeef0001", "fact").status == "interrupted"
    assert "nothing to cancel" in pcrt("dag", "cancel", "deadbeef0001").stdout


def test_an_invalid_dag_lists_every_problem(tmp_path: Path) -> None:
    bad = {
        "dag": "/dynamic/bad",
        "nodes": {
            "a": {"type": "llm", "model": "nope", "prompt": "{{ nodes.b.output }}"},
            "b": {"type": "llm", "tag": "simple", "prompt": "{{ nodes.a.output }}"},
            "c": {"type": "assert", "that": "inputs.missing > 1"},
        },
    }
    result = pcrt("dag", "run", str(write_dag(tmp_path / "bad.yaml", bad)))
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("invalid DAG") and "3 problems" in lines[0]
    assert any("node 'a'" in line and "nope" in line for line in lines)
    assert any("node 'a'" in line and "cycle" in line for line in lines)
    assert any("node 'c'" in line and "missing" in line for line in lines)
    # a node of an unknown type hides none of the others (nor the unknown model)
    bad["nodes"]["d"] = {"type": "weird"}
    weird = pcrt("dag", "run", str(write_dag(tmp_path / "weird.yaml", bad)))
    assert weird.exit_code == 1 and "4 problems" in weird.stderr.splitlines()[0], weird.stderr
    assert all(w in weird.stderr for w in ("'weird'", "nope", "cycle", "missing"))
    unknown_input = pcrt("dag", "run", str(EXAMPLE), "-i", "nope=1")
    assert unknown_input.exit_code == 1 and "inputs.nope: unknown input" in unknown_input.stderr


@pytest.mark.parametrize("command", ["status", "resume", "cancel"])
def test_an_unknown_run_is_a_one_line_error(command: str) -> None:
    result = pcrt("dag", command, "nosuchrun")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no DAG run 'nosuchrun' (see `pcrt dag list`)"


def test_a_run_id_prefix_names_one_run_or_says_which(pcrt_env: Paths) -> None:
    from pcrt.cli.dag_local import full_run_id

    with Store(pcrt_env.db_path) as store:
        runs = RunStore(store)
        for run_id in ("abcd1111", "abcd2222", "ffff0000"):
            runs.create_run(run_id, "/dynamic/t", {"dag": "/dynamic/t"}, {}, [])
        assert full_run_id(runs, "ffff") == "ffff0000"
        assert full_run_id(runs, "abcd1") == "abcd1111"
        assert full_run_id(runs, "abc") == "abc"  # under 4 characters: taken as it is
        assert full_run_id(runs, "zzzz") == "zzzz"  # no match: the daemon may know it
        with pytest.raises(PcrtError, match="starts several runs' ids .*abcd"):
            full_run_id(runs, "abcd")


def test_the_trip_plan_example_finishes_within_its_bounds(default_model_path: Path) -> None:
    """The README's second example: its schema and token bounds keep the small model
    from looping (unbounded, it listed interests past 400 tokens)."""
    trip = EXAMPLE.with_name("trip_plan.yaml")
    result = pcrt(
        "dag", "run", str(trip), "-i", "request=A weekend in Lisbon: food, museums", "--json"
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    assert run["status"] == "succeeded", run
    tokens = {n["node_id"]: n.get("completion_tokens") or 0 for n in run["nodes"]}
    assert tokens["prefs"] <= 120 and tokens["ideas"] <= 3 * 160 and tokens["followup"] <= 120


def test_status_of_a_running_node_and_of_a_cancelled_run(pcrt_env: Paths) -> None:
    """A node under way says it is generating (and how far its checkpoint got), not
    "completion 0"; once its run stops, no node of it still says running."""
    from rich.console import Console

    from pcrt.cache.runs import NodeCheckpointed, NodeStarted
    from pcrt.cache.status import RunStatus
    from pcrt.cli.dag_tree import run_tree
    from pcrt.runtime.dag.tasks import run_view

    spec = parse_dag(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    nodes = [(n, f"{spec.dag}/{n}", node.type) for n, node in spec.nodes.items()]
    with Store(pcrt_env.db_path) as store:
        runs = RunStore(store)
        runs.create_run("r1", spec.dag, spec.document(), {}, nodes)
        runs.set_status("r1", RunStatus.RUNNING)
        runs.update_node("r1", "summary", NodeStarted(ran_on="local", prompt_tokens=40))
        runs.update_node("r1", "summary", NodeCheckpointed("0" * 64, 128))
        console = Console(width=200, record=True)
        console.print(run_tree(run_view(runs, runs.get_run("r1")), spec))
        shown = console.export_text()
        assert "completion: generating (128 at its last checkpoint)" in shown
        assert "completion 0" not in shown

        runs.set_status("r1", RunStatus.CANCELLED, error="cancelled; checkpoints kept")
        statuses = {n.node_id: n.status for n in runs.nodes("r1")}
        assert statuses["summary"] == "interrupted" and "running" not in statuses.values()
