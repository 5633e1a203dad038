"""The library of /lib subgraphs: loading, validation of calls, and the pure parts of a call.

Fast: no model, no engine (the registry is the built-in catalogue).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from pcrt.cli.main import main
from pcrt.runtime.dag import make_environment, parse_dag
from pcrt.runtime.dag.library import (
    Library,
    library_from_documents,
    load_library,
    load_library_paths,
    run_library,
    with_library,
)
from pcrt.runtime.dag.runner import check_run
from pcrt.runtime.dag.spec import Budget
from pcrt.runtime.dag.subgraph import (
    budget_limit,
    call_cache_key,
    call_outputs,
    child_budget,
    child_spec,
    is_deterministic,
)
from pcrt.runtime.errors import DagInvalid, Problem
from pcrt.runtime.models.registry import Registry
from pcrt.runtime.paths import Paths


def describe_lib(path: str = "/lib/text/describe", **node: Any) -> dict[str, Any]:
    return {
        "dag": path,
        "signature": {
            "inputs": {"thing": {"type": "string"}, "style": {"default": "short"}},
            "outputs": {"line": {}, "shout": {"value": "nodes.line.output | upper"}},
        },
        "nodes": {
            "line": {
                "type": "llm",
                "tag": "simple",
                "temperature": 0,
                "max_tokens": 8,
                "prompt": "Describe {{ inputs.thing }} in one {{ inputs.style }} line.",
                **node,
            }
        },
    }


def caller(**nodes: dict[str, Any]) -> dict[str, Any]:
    return {"dag": "/dynamic/caller", "inputs": {"q": {"default": "tea"}}, "nodes": nodes}


def call(dag: str = "/lib/text/describe", **inputs: Any) -> dict[str, Any]:
    return {"type": "subgraph", "dag": dag, "inputs": inputs}


def write(path: Path, document: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(document, str):
        path.write_text(document, encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(document), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def messages(problems: tuple[Problem, ...] | list[Problem]) -> str:
    return "\n".join(str(p) for p in problems)


def test_the_library_is_home_lib_then_pcrt_lib_path(
    pcrt_env: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra_a, extra_b = tmp_path / "team-lib", tmp_path / "more"
    monkeypatch.setenv("PCRT_LIB_PATH", os.pathsep.join([str(extra_a), str(extra_b)]))
    paths = Paths.from_env()
    assert paths.lib_dirs == (pcrt_env.home / "lib", extra_a, extra_b)
    write(paths.home / "lib" / "text" / "describe.yaml", describe_lib())
    write(extra_a / "shout.json", describe_lib("/lib/shout"))
    toml = 'dag = "/lib/echo"\n[signature]\noutputs = ["a"]\n'
    toml += '[nodes.a]\ntype = "assert"\nthat = "true"\n'
    write(extra_b / "deep" / "echo.toml", toml)
    write(extra_b / "plan.yaml", {**caller(a=call(thing="x")), "dag": "/dynamic/plan"})
    write(extra_b / "notes.txt", "not a DAG")

    library = load_library(paths.lib_dirs)
    assert library.problems == ()
    assert sorted(library.dags) == ["/lib/echo", "/lib/shout", "/lib/text/describe"]
    assert library.sources["/lib/shout"] == str(extra_a / "shout.json")
    # a directory that does not exist is no library, and no error
    assert load_library([tmp_path / "nowhere"]).dags == {}


def test_a_bad_file_is_a_problem_naming_it_and_hides_nothing(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    write(lib / "good.yaml", describe_lib())
    write(lib / "broken.yaml", "dag: /lib/broken\nnodes: [unclosed\n")
    write(lib / "typo.yaml", {**describe_lib("/lib/typo"), "nodez": {}})
    write(lib / "twice.json", describe_lib())

    library = load_library([lib])
    assert list(library.dags) == ["/lib/text/describe"]  # the good one still loads
    text = messages(library.problems)
    assert f"library file {lib / 'broken.yaml'}: YAML syntax error" in text
    assert f"library file {lib / 'typo.yaml'}: nodez: unknown key" in text
    assert "/lib/text/describe is defined twice" in text and str(lib / "twice.json") in text
    assert len(library.problems) == 3

    # a file named on purpose (--lib) must be a /lib DAG
    plan = write(tmp_path / "plan.yaml", {**describe_lib(), "dag": "/dynamic/plan"})
    named = load_library_paths([plan, lib / "good.yaml"])
    assert "/dynamic/plan is not a /lib/... subgraph" in messages(named.problems)
    assert list(named.dags) == ["/lib/text/describe"]


def test_documents_from_a_request_are_text_or_data_never_file_names(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret.yaml", describe_lib("/lib/secret"))
    library = library_from_documents(
        [
            yaml.safe_dump(describe_lib("/lib/a")),
            describe_lib("/lib/b"),
            str(secret),
            {"dag": "/dynamic/x", "nodes": {"a": {"type": "assert", "that": "true"}}},
        ]
    )
    assert sorted(library.dags) == ["/lib/a", "/lib/b"]
    text = messages(library.problems)
    assert "library[2]: a DAG document is a mapping, not str" in text  # not read
    assert "library[3]: /dynamic/x is not a /lib/... subgraph" in text


def test_run_library_layers_directories_document_and_request(tmp_path: Path) -> None:
    write(tmp_path / "lib" / "d.yaml", describe_lib())
    carried = describe_lib(max_tokens=5)  # a document's own copy overrides the directory's
    spec = parse_dag({**caller(a=call(thing="x")), "library": [carried]})
    layered = run_library(spec, [tmp_path / "lib"])
    assert layered.problems == ()
    assert layered.dags["/lib/text/describe"].nodes["line"].max_tokens == 5
    assert layered.sources["/lib/text/describe"] == "/dynamic/caller library[0]"
    request = library_from_documents([describe_lib(max_tokens=3)])
    assert (
        run_library(spec, [tmp_path / "lib"], request)
        .dags["/lib/text/describe"]
        .nodes["line"]
        .max_tokens
        == 3
    )
    # a DAG that calls nothing does not read the directories at all
    write(tmp_path / "lib" / "broken.yaml", "dag: [")
    plain = parse_dag({"dag": "/dynamic/p", "nodes": {"a": {"type": "assert", "that": "true"}}})
    assert run_library(plain, [tmp_path / "lib"]) == Library()


def test_a_run_stores_the_library_it_can_reach_and_round_trips() -> None:
    inner = {
        "dag": "/lib/outer",
        "signature": {"outputs": ["d"]},
        "nodes": {"d": call(thing="{{ 'y' }}")},
    }
    library = library_from_documents([describe_lib(), inner, describe_lib("/lib/unused")])
    spec = parse_dag(caller(a=call("/lib/outer")))
    stored = with_library(spec, library.closure(spec))
    assert [d["dag"] for d in stored.library] == ["/lib/outer", "/lib/text/describe"]
    assert parse_dag(stored.document()) == stored
    assert parse_dag(json.loads(json.dumps(stored.document()))).document() == stored.document()
    # without callees the document is left as it was
    assert with_library(spec, {}) is spec


def test_validation_lists_library_and_call_problems_together(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    write(lib / "describe.yaml", describe_lib())
    write(lib / "broken.yaml", "dag: /lib/broken\nnodes: {a: {type: llm, prompt: [}}\n")
    write(
        lib / "loop_a.yaml",
        {
            "dag": "/lib/loop/a",
            "signature": {"outputs": ["b"]},
            "nodes": {"b": call("/lib/loop/b")},
        },
    )
    write(
        lib / "loop_b.yaml",
        {
            "dag": "/lib/loop/b",
            "signature": {"outputs": ["a"]},
            "nodes": {"a": call("/lib/loop/a")},
        },
    )
    write(lib / "bad_model.yaml", describe_lib("/lib/bad_model", tag=None, model="nope"))
    spec = parse_dag(
        caller(
            unknown=call("/lib/nowhere"),
            missing=call(style="long"),
            loop=call("/lib/loop/a"),
            model=call("/lib/bad_model", thing="{{ inputs.q }}"),
        )
    )
    with pytest.raises(DagInvalid) as caught:
        check_run(spec, Registry.load(), {}, library=run_library(spec, [lib]))
    text = messages(caught.value.problems)
    assert "library file" in text and "broken.yaml" in text
    assert "node 'unknown', dag: no library subgraph /lib/nowhere" in text
    assert "node 'missing', inputs.thing: /lib/text/describe requires this input" in text
    assert "node 'loop', dag: subgraph recursion: /dynamic/caller -> /lib/loop/a" in text
    assert "node '/lib/bad_model/line', model: unknown model 'nope'" in text
    assert text.count("recursion") == 1  # once, on the caller's node that leads there
    assert len(caught.value.problems) == 5


def test_budget_outputs_determinism_and_cache_key() -> None:
    caller_budget = Budget(max_tokens=100, max_nodes=10, timeout_sec=60)
    assert child_budget(Budget(max_tokens=50), caller_budget, 70, 4) == Budget(
        max_tokens=30, max_nodes=6
    )
    assert child_budget(Budget(max_tokens=20, timeout_sec=5), Budget(), 0, 0) == Budget(
        max_tokens=20, timeout_sec=5
    )
    assert budget_limit("budget exceeded: max_tokens (12 of 10 used)") == (
        "max_tokens",
        "12 of 10 used",
    )

    library = library_from_documents([describe_lib()])
    callee = library.dags["/lib/text/describe"]
    outputs = asyncio.run(
        call_outputs(make_environment(), callee, {"thing": "tea"}, {"line": "hot tea"}, node="a")
    )
    assert outputs == {"line": "hot tea", "shout": "HOT TEA"}

    assert is_deterministic(callee, library)
    sampled = library_from_documents([describe_lib(temperature=0.7)])
    assert not is_deterministic(sampled.dags["/lib/text/describe"], sampled)
    seeded = library_from_documents([describe_lib(temperature=0.7, seed=3)])
    assert is_deterministic(seeded.dags["/lib/text/describe"], seeded)

    spec = child_spec(callee, library, Budget(max_tokens=9))
    key = call_cache_key("/lib/text/describe", {"thing": "tea"}, spec.document(), ["m"], "v1")
    assert key == call_cache_key(
        "/lib/text/describe", {"thing": "tea"}, spec.document(), ["m"], "v1"
    )
    for other in (
        call_cache_key("/lib/text/describe", {"thing": "ink"}, spec.document(), ["m"], "v1"),
        call_cache_key("/lib/text/describe", {"thing": "tea"}, spec.document(), ["n"], "v1"),
        call_cache_key("/lib/text/describe", {"thing": "tea"}, spec.document(), ["m"], "v2"),
        call_cache_key("/lib/text/describe", {"thing": "tea"}, callee.document(), ["m"], "v1"),
    ):
        assert other != key


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_pcrt_dag_lib_lists_signatures_and_problems(pcrt_env: Paths) -> None:
    empty = pcrt("dag", "lib")
    assert empty.exit_code == 0 and "no /lib subgraphs" in empty.output
    write(pcrt_env.home / "lib" / "describe.yaml", describe_lib())
    listed = pcrt("dag", "lib", "--json")
    assert listed.exit_code == 0
    [entry] = json.loads(listed.stdout)["dags"]
    assert entry["path"] == "/lib/text/describe"
    assert entry["inputs"]["style"] == {"type": "string", "required": False, "default": "short"}
    assert list(entry["outputs"]) == ["line", "shout"]
    assert "/lib/text/describe" in pcrt("dag", "lib").stdout
    write(pcrt_env.home / "lib" / "broken.yaml", "dag: [")
    broken = pcrt("dag", "lib")
    assert broken.exit_code == 1 and "broken.yaml" in broken.stderr


def test_pcrt_dag_run_reports_library_problems_before_running(
    pcrt_env: Paths, tmp_path: Path
) -> None:
    dag = write(tmp_path / "dag.yaml", caller(a=call(thing="x"), b=call("/lib/nowhere")))
    bad_lib = write(tmp_path / "bad.yaml", {**describe_lib(), "extra": 1})
    result = pcrt("dag", "run", str(dag), "--lib", str(bad_lib))
    assert result.exit_code == 1
    assert "bad.yaml: extra: unknown key" in result.stderr
    result = pcrt("dag", "run", str(dag))
    assert result.exit_code == 1
    assert "no library subgraph /lib/nowhere" in result.stderr
    assert "no library subgraph /lib/text/describe" in result.stderr
