"""The DAG format: parsing (YAML, JSON, TOML), validation, dependency levels, templates.

Pure and fast: no model, no engine, no HTTP.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcrt.runtime.dag import (
    DagSpec,
    ForkNode,
    LlmNode,
    SubgraphNode,
    bind_inputs,
    check_assert,
    count_nodes,
    dependencies,
    ensure_valid,
    evaluate,
    load_dag,
    make_environment,
    make_scope,
    parse_dag,
    render,
    render_value,
    topological_order,
    validate,
)
from pcrt.runtime.errors import AssertFailed, DagInvalid, Problem, RenderFailed, ShapeInvalid

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "dags"
MODELS = {"smollm2-135m", "smollm2", "default"}
TAGS = {"simple", "chat"}

ISSUE_YAML = """\
dag: /dynamic/trip_plan
inputs: {request: {type: string}}
budget: {max_nodes: 20, max_tokens: 4096, timeout_sec: 300}
nodes:
  prefs:
    type: llm
    prompt: "List the interests in: {{ inputs.request }}"
    output_schema: {type: object, properties: {interests: {type: array, items: {type: string}}}, required: [interests]}
  ideas:
    type: fork
    needs: [prefs]
    prompt: "Plan a day around {{ nodes.prefs.output.interests | join(', ') }}."
    samples: 3
  followup:
    type: llm
    context: prefs          # continue prefs' context: its saved KV is restored, not recomputed
    prompt: "Now rank them."
  check:
    type: assert
    needs: [prefs]
    that: "nodes.prefs.output.interests | length > 0"
"""  # noqa: E501 - the issue's text, verbatim

ISSUE_TOML = """\
dag = "/dynamic/trip_plan"

[inputs.request]
type = "string"

[budget]
max_nodes = 20
max_tokens = 4096
timeout_sec = 300

[nodes.prefs]
type = "llm"
prompt = "List the interests in: {{ inputs.request }}"
output_schema = { type = "object", properties = { interests = { type = "array", items = { type = "string" } } }, required = ["interests"] }

[nodes.ideas]
type = "fork"
needs = ["prefs"]
prompt = "Plan a day around {{ nodes.prefs.output.interests | join(', ') }}."
samples = 3

[nodes.followup]
type = "llm"
context = "prefs"
prompt = "Now rank them."

[nodes.check]
type = "assert"
needs = ["prefs"]
that = "nodes.prefs.output.interests | length > 0"
"""  # noqa: E501


def issue_doc() -> dict[str, Any]:
    doc = yaml.safe_load(ISSUE_YAML)
    assert isinstance(doc, dict)
    return doc


def doc_with(nodes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"dag": "/dynamic/t", "inputs": {"q": {"type": "string"}}, "nodes": nodes, **top}


def check(spec: DagSpec, library: dict[str, DagSpec] | None = None) -> list[Problem]:
    return validate(spec, known_models=MODELS, known_tags=TAGS, library=library)


def problems_of(doc: dict[str, Any], library: dict[str, DagSpec] | None = None) -> list[Problem]:
    return check(parse_dag(doc), library)


def parse_problems(doc: Any) -> list[Problem]:
    with pytest.raises(DagInvalid) as info:
        parse_dag(doc)
    return list(info.value.problems)


def has(problems: list[Problem], node: str | None, field: str | None, *words: str) -> bool:
    return any(
        p.node == node and p.field == field and all(w in p.message for w in words) for p in problems
    )


def summarize_lib() -> DagSpec:
    return parse_dag(
        {
            "dag": "/lib/text/summarize",
            "signature": {
                "inputs": {"text": {"type": "string"}, "words": {"type": "integer", "default": 20}},
                "outputs": {"summary": {}, "length": {"value": "nodes.summary.output | length"}},
            },
            "nodes": {
                "summary": {
                    "type": "llm",
                    "prompt": "Summarize in {{ inputs.words }} words: {{ inputs.text }}",
                }
            },
        }
    )


# -- parsing ------------------------------------------------------------------------------


def test_issue_example_parses_from_yaml_json_and_toml_alike() -> None:
    from_yaml = load_dag(ISSUE_YAML)
    from_json = load_dag(json.dumps(issue_doc()))
    from_toml = load_dag(ISSUE_TOML)
    assert tomllib.loads(ISSUE_TOML)["nodes"]["prefs"]["output_schema"]["required"] == ["interests"]
    assert from_yaml == from_json == from_toml
    assert check(from_yaml) == []

    prefs = from_yaml.nodes["prefs"]
    assert isinstance(prefs, LlmNode)
    assert prefs.id == "prefs" and prefs.path == "/dynamic/trip_plan/prefs"
    assert prefs.cache is True and prefs.checkpoint_every == 128 and prefs.route == "auto"
    ideas = from_yaml.nodes["ideas"]
    assert isinstance(ideas, ForkNode) and ideas.samples == 3 and ideas.branches is None
    assert from_yaml.budget.max_nodes == 20 and from_yaml.budget.timeout_sec == 300
    assert from_yaml.inputs["request"].required
    # the round-trippable form reads back equal
    assert parse_dag(from_yaml.document()) == from_yaml


def test_files_by_suffix_and_explicit_format(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text(ISSUE_YAML)
    (tmp_path / "b.json").write_text(json.dumps(issue_doc()))
    (tmp_path / "c.toml").write_text(ISSUE_TOML)
    (tmp_path / "d.txt").write_text(ISSUE_TOML)
    specs = [load_dag(tmp_path / "a.yml"), load_dag(str(tmp_path / "b.json"))]
    specs += [load_dag(tmp_path / "c.toml"), load_dag(tmp_path / "d.txt", format="toml")]
    assert all(s == specs[0] for s in specs)
    with pytest.raises(DagInvalid, match="unknown DAG file type"):
        load_dag(tmp_path / "d.txt")
    with pytest.raises(DagInvalid, match="cannot read"):
        load_dag(tmp_path / "missing.yaml")


def test_example_files_validate_clean() -> None:
    catalogue = tomllib.loads((ROOT / "models.toml").read_text())["models"]
    models = set(catalogue) | {a for m in catalogue.values() for a in m.get("aliases", [])}
    tags = {t for m in catalogue.values() for t in m.get("tags", [])}
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"trip_plan.yaml", "summary_titles.yaml"}
    for file in files:
        spec = load_dag(file)
        assert validate(spec, known_models=models, known_tags=tags) == [], file.name
    small = load_dag(EXAMPLES / "summary_titles.yaml")
    assert topological_order(small) == [["summary"], ["titles"], ["check"]]
    assert bind_inputs(small, {})["text"].startswith("The llama.cpp project")


@pytest.mark.parametrize(
    ("text", "fmt", "words"),
    [
        ("dag: /dynamic/x\nnodes: {a: {type: llm, prompt: [}\n", None, "YAML syntax error"),
        ('{"dag": "/dynamic/x", "nodes": {', None, "JSON syntax error at line 1"),
        ('dag = "/dynamic/x"\n[nodes.a\n', None, "TOML syntax error"),
        (
            "dag: /dynamic/x\nnodes:\n  a: {type: llm, prompt: x}\n  a: {type: llm, prompt: y}\n",
            None,
            "duplicate key 'a'",
        ),
        ('{"dag": "/dynamic/x", "dag": "/dynamic/y", "nodes": {}}', None, "duplicate key 'dag'"),
        ("- just\n- a list\n", None, "a DAG document is a mapping"),
    ],
)
def test_syntax_errors_are_dag_invalid(text: str, fmt: Any, words: str) -> None:
    with pytest.raises(DagInvalid) as info:
        load_dag(text, format=fmt)
    assert len(info.value.problems) == 1
    assert words in info.value.problems[0].message
    assert info.value.problems[0].node is None


def test_shape_errors_name_node_and_field() -> None:
    problems = parse_problems(
        {
            "dag": "dynamic/no-slash",
            "budget": {"max_nodes": 0, "wall": 3},
            "nodes": {
                "a": {"type": "tool_call", "prompt": "x"},
                "b": {"type": "llm", "prompt": "x", "temprature": 0.1},
                "c": {"type": "llm", "prompt": "x", "model": "m", "tag": "simple"},
                "d": {"prompt": "x"},
                "e": {"type": "llm", "prompt": "x", "top_p": 2},
                "9bad": {"type": "llm", "prompt": "x"},
                "f": {"type": "llm"},
            },
        }
    )
    assert has(problems, None, "dag", "/dynamic/NAME")
    assert has(problems, None, "budget.max_nodes")
    assert has(problems, None, "budget.wall", "unknown key")
    assert has(problems, "a", "type", "unknown node type 'tool_call'", "llm, fork, assert")
    assert has(problems, "b", "temprature", "unknown key")
    assert has(problems, "c", None, "model or tag, not both")
    assert has(problems, "d", "type", "needs a type")
    assert has(problems, "e", "top_p")
    assert has(problems, "9bad", "id", "a node id is a name")
    assert has(problems, "f", "prompt", "required")
    assert "tool_call" in str(DagInvalid(problems))


def test_fork_takes_samples_or_branches_exactly() -> None:
    both = {"type": "fork", "prompt": "p", "samples": 2, "branches": ["a"]}
    neither = {"type": "fork", "prompt": "p"}
    no_prompt = {"type": "fork", "samples": 2}
    generating_branches = {"type": "fork", "branches": ["a"], "temperature": 0.5}
    problems = parse_problems(
        doc_with(
            {
                "a": {"type": "llm", "prompt": "x"},
                "both": both,
                "neither": neither,
                "no_prompt": no_prompt,
                "gen": generating_branches,
            }
        )
    )
    assert has(problems, "both", None, "exactly one of samples")
    assert has(problems, "neither", None, "exactly one of samples")
    assert has(problems, "no_prompt", None, "needs a prompt")
    assert has(problems, "gen", None, "takes no generation fields", "temperature")
    assert len(problems) == 4


def test_subgraph_node_shape_and_paths() -> None:
    spec = parse_dag(
        doc_with(
            {
                "s": {"type": "subgraph", "dag": "/lib/text/summarize", "inputs": {"text": "x"}},
                "own": {"type": "llm", "prompt": "x", "path": "/dynamic/elsewhere/own"},
            }
        )
    )
    assert isinstance(spec.nodes["s"], SubgraphNode)
    assert spec.nodes["s"].path == "/dynamic/t/s"
    assert spec.nodes["own"].path == "/dynamic/elsewhere/own"
    problems = parse_problems(doc_with({"s": {"type": "subgraph", "dag": "/dynamic/x"}}))
    assert has(problems, "s", "dag")


def hinted_callee() -> DagSpec:
    return parse_dag(
        {
            "dag": "/lib/hinted",
            "signature": {"inputs": [], "outputs": ["plain"]},
            "nodes": {
                "plain": {"type": "llm", "prompt": "x"},
                "said_auto": {"type": "llm", "prompt": "x", "route": "auto"},
                "own_route": {"type": "llm", "prompt": "x", "route": "peer"},
                "own_complexity": {"type": "llm", "prompt": "x", "complexity": "low"},
                "samples": {"type": "fork", "prompt": "x", "samples": 2},
                "branches": {"type": "fork", "branches": ["plain", "own_route"]},
                "call": {"type": "subgraph", "dag": "/lib/other"},
                "check": {"type": "assert", "that": "true"},
            },
        }
    )


def test_a_calls_hints_are_the_defaults_of_the_callees_nodes() -> None:
    callee = hinted_callee()
    called = callee.called_with("local", "high")

    def hints(node_id: str) -> tuple[str, str | None]:
        node = called.nodes[node_id]
        assert isinstance(node, LlmNode | ForkNode | SubgraphNode)
        return node.route, node.complexity

    assert hints("plain") == hints("said_auto") == hints("samples") == ("local", "high")
    assert hints("call") == ("local", "high")  # passed on to its own callee in turn
    assert hints("own_route") == ("peer", "high")  # the node's own setting wins
    assert hints("own_complexity") == ("local", "low")
    # nodes that run nothing anywhere take nothing: a fork of branches stays valid
    assert called.document()["nodes"]["branches"] == callee.document()["nodes"]["branches"]
    assert called.nodes["check"] == callee.nodes["check"]
    # the hints are written in the document, which reads back equal; the rest is the same
    assert parse_dag(called.document()) == called
    assert called.model_copy(update={"nodes": callee.nodes}) == callee
    other = parse_dag(
        {
            "dag": "/lib/other",
            "signature": {"outputs": ["a"]},
            "nodes": {"a": {"type": "llm", "prompt": "x"}},
        }
    )
    assert check(called, {"/lib/other": other}) == check(callee, {"/lib/other": other}) == []


def test_a_call_with_one_hint_or_none() -> None:
    callee = hinted_callee()
    assert callee.called_with() is callee  # no hints: the same document, the same cache key
    assert callee.called_with("auto", None) is callee
    only_complexity = callee.called_with(complexity="medium")
    plain = only_complexity.nodes["plain"]
    assert isinstance(plain, LlmNode) and (plain.route, plain.complexity) == ("auto", "medium")
    only_route = callee.called_with("peer")
    plain = only_route.nodes["plain"]
    assert isinstance(plain, LlmNode) and (plain.route, plain.complexity) == ("peer", None)
    assert "complexity" not in only_route.document()["nodes"]["plain"]


def test_hints_on_a_subgraph_node_are_checked_on_that_node() -> None:
    call = {"type": "subgraph", "dag": "/lib/hinted", "route": "remote", "complexity": "huge"}
    problems = parse_problems(doc_with({"s": call, "ok": {"type": "llm", "prompt": "x"}}))
    assert has(problems, "s", "route") and has(problems, "s", "complexity")
    assert len(problems) == 2


# -- validation -----------------------------------------------------------------------------


def test_cycle_names_its_nodes_in_order() -> None:
    problems = problems_of(
        doc_with(
            {
                "start": {"type": "llm", "prompt": "{{ inputs.q }}"},
                "a": {"type": "llm", "prompt": "{{ nodes.c.output }}", "needs": ["start"]},
                "b": {"type": "llm", "prompt": "{{ nodes.a.output }}"},
                "c": {"type": "llm", "prompt": "x", "needs": ["b"]},
                "selfish": {"type": "llm", "prompt": "{{ nodes.selfish.output }}"},
            }
        )
    )
    assert has(problems, "a", None, "a -> c -> b -> a")
    assert has(problems, "selfish", None, "selfish -> selfish")
    assert len(problems) == 2
    with pytest.raises(DagInvalid, match="dependency cycle"):
        topological_order(parse_dag(doc_with({"x": {"type": "llm", "prompt": "{{ nodes.x }}"}})))


def test_unknown_input_and_node_references() -> None:
    problems = problems_of(
        doc_with(
            {
                "a": {"type": "llm", "prompt": "{{ inputs.qq }} {{ nodes.ghost.output }}"},
                "b": {"type": "llm", "system": "{{ nodes.a.result }}", "prompt": "{{ stray }}"},
                "c": {"type": "llm", "prompt": "{% for n in ['a'] %}{{ nodes[n] }}{% endfor %}"},
                "d": {"type": "assert", "that": "inputs['q'] and nodes['a'].output"},
            }
        )
    )
    assert has(problems, "a", "prompt", "unknown input 'qq'", "known: q")
    assert has(problems, "a", "prompt", "unknown node 'ghost'")
    assert has(problems, "b", "system", "exposes only .output")
    assert has(problems, "b", "prompt", "unknown name 'stray'")
    assert has(problems, "c", "prompt", "constant id")
    assert not [p for p in problems if p.node == "d"]
    assert len(problems) == 5


def test_unknown_model_and_tag() -> None:
    problems = problems_of(
        doc_with(
            {
                "a": {"type": "llm", "prompt": "x", "model": "gpt-9"},
                "b": {"type": "fork", "prompt": "x", "samples": 2, "tag": "genius"},
                "ok": {"type": "llm", "prompt": "x", "model": "smollm2", "temperature": 0},
            }
        )
    )
    assert has(problems, "a", "model", "unknown model 'gpt-9'", "smollm2-135m")
    assert has(problems, "b", "tag", "unknown tag 'genius'", "simple")
    assert len(problems) == 2


def test_lib_dag_without_signature() -> None:
    doc = {"dag": "/lib/x", "nodes": {"a": {"type": "llm", "prompt": "x"}}}
    assert has(problems_of(doc), None, "signature", "must declare a signature")
    # a signature's inputs are what templates read; inputs outside it are unreachable
    doc["signature"] = {"inputs": ["q"], "outputs": ["a"]}
    doc["inputs"] = {"extra": {"type": "string"}}
    doc["nodes"]["a"]["prompt"] = "{{ inputs.q }}"
    problems = problems_of(doc)
    assert problems == [
        Problem(
            node=None,
            field="inputs.extra",
            message="not in the signature's inputs, so no caller can give it",
        )
    ]
    doc["signature"]["outputs"] = {"nothing": {}, "bad": {"value": "nodes.zz.output"}}
    del doc["inputs"]
    problems = problems_of(doc)
    assert has(problems, None, "signature.outputs.nothing", "no node 'nothing'")
    assert has(problems, None, "signature.outputs.bad.value", "unknown node 'zz'")


def test_invalid_output_schema() -> None:
    problems = problems_of(
        doc_with(
            {
                "a": {"type": "llm", "prompt": "x", "output_schema": {"type": "objekt"}},
                "b": {
                    "type": "llm",
                    "prompt": "x",
                    "output_schema": {"type": "object", "properties": {"n": {"minimum": "1"}}},
                },
                "ok": {"type": "llm", "prompt": "x", "output_schema": {"type": "object"}},
            }
        )
    )
    assert has(problems, "a", "output_schema.type", "invalid JSON schema")
    assert has(problems, "b", "output_schema.properties.n.minimum", "invalid JSON schema")
    assert len(problems) == 2


def test_an_output_schema_decoding_cannot_honour_is_a_problem_of_its_node() -> None:
    """A valid schema with a keyword constrained decoding does not take fails the DAG at
    validation, named where it is, not its run at that node."""
    tags = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    link = {"type": "string", "format": "uri-reference"}
    problems = problems_of(
        doc_with(
            {
                "a": {
                    "type": "llm",
                    "prompt": "x",
                    "output_schema": {"type": "object", "properties": {"tags": tags}},
                },
                "b": {"type": "llm", "prompt": "x", "output_schema": link},
                "c": {"type": "llm", "prompt": "x", "output_schema": link},
            }
        )
    )
    assert has(problems, "a", "output_schema.properties.tags.uniqueItems", "not supported")
    assert has(problems, "b", "output_schema.format", "uri-reference")
    assert has(problems, "c", "output_schema.format", "uri-reference")  # each node its own
    assert len(problems) == 3


def test_budget_that_cannot_be_met() -> None:
    nodes = {
        "a": {"type": "llm", "prompt": "x"},
        "f": {"type": "fork", "prompt": "x", "samples": 4},
        "s": {"type": "subgraph", "dag": "/lib/text/summarize", "inputs": {"text": "y"}},
        "c": {"type": "assert", "that": "true"},
    }
    lib = {"/lib/text/summarize": summarize_lib()}
    spec = parse_dag(doc_with(nodes, budget={"max_nodes": 6}))
    assert count_nodes(spec, lib) == 1 + 4 + 1 + 1
    problems = check(spec, lib)
    assert problems == [
        Problem(
            node=None,
            field="budget.max_nodes",
            message="the DAG runs 7 nodes (a fork's samples count one each, a subgraph its "
            "nodes) but max_nodes is 6",
        )
    ]
    assert check(parse_dag(doc_with(nodes, budget={"max_nodes": 7})), lib) == []


def test_context_must_be_an_upstream_llm_node() -> None:
    problems = problems_of(
        doc_with(
            {
                "a": {"type": "llm", "prompt": "x", "model": "smollm2"},
                "f": {"type": "fork", "prompt": "x", "samples": 2},
                "k": {"type": "assert", "that": "true"},
                "on_fork": {"type": "llm", "prompt": "x", "context": "f"},
                "on_assert": {"type": "llm", "prompt": "x", "context": "k"},
                "on_ghost": {"type": "llm", "prompt": "x", "context": "ghost"},
                "with_system": {"type": "llm", "prompt": "x", "context": "a", "system": "s"},
                "other_model": {"type": "llm", "prompt": "x", "context": "a", "model": "default"},
                "fine": {"type": "fork", "prompt": "x", "context": "a", "samples": 2},
                "loop": {"type": "llm", "prompt": "{{ nodes.back.output }}"},
                "back": {"type": "llm", "prompt": "x", "context": "loop"},
            }
        )
    )
    assert has(problems, "on_fork", "context", "'f' is a fork node")
    assert has(problems, "on_assert", "context", "'k' is a assert node")
    assert has(problems, "on_ghost", "context", "unknown node 'ghost'")
    assert has(problems, "with_system", "system", "keeps its system prompt")
    assert has(problems, "other_model", "model", "'default' differs from 'smollm2'")
    assert has(problems, "loop", None, "loop -> back -> loop")
    assert not [p for p in problems if p.node == "fine"]
    assert len(problems) == 6


def test_needs_and_branches_name_known_independent_nodes() -> None:
    problems = problems_of(
        doc_with(
            {
                "a": {"type": "llm", "prompt": "x", "needs": ["nope"]},
                "b": {"type": "llm", "prompt": "{{ nodes.a.output }}"},
                "c": {"type": "llm", "prompt": "x"},
                "fan": {"type": "fork", "branches": ["a", "b", "ghost", "c", "c"]},
            }
        )
    )
    assert has(problems, "a", "needs", "unknown node 'nope'")
    assert has(problems, "fan", "branches", "unknown node 'ghost'")
    assert has(problems, "fan", "branches", "'c' is listed twice")
    assert has(problems, "fan", "branches", "branch 'b' needs branch 'a'")
    assert len(problems) == 4


def test_output_fields_are_checked_against_what_nodes_produce() -> None:
    closed = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "additionalProperties": False,
    }
    problems = problems_of(
        doc_with(
            {
                "text": {"type": "llm", "prompt": "x"},
                "many": {"type": "fork", "prompt": "x", "samples": 2},
                "obj": {"type": "llm", "prompt": "x", "output_schema": closed},
                "use": {
                    "type": "llm",
                    "prompt": "{{ nodes.text.output.headline }} {{ nodes.text.output.strip() }}"
                    " {{ nodes.many.output.best }} {{ nodes.many.output[1] }}"
                    " {{ nodes.obj.output.m }} {{ nodes.obj.output.n }}",
                },
            }
        )
    )
    assert has(problems, "use", "prompt", "'text' has no output_schema")
    assert has(problems, "use", "prompt", "fork 'many' is a list", "output[0]")
    assert has(problems, "use", "prompt", "no property 'm'")
    assert len(problems) == 3


def test_subgraph_inputs_and_outputs_match_the_signature() -> None:
    bare = parse_dag({"dag": "/lib/bare", "nodes": {"a": {"type": "llm", "prompt": "x"}}})
    lib = {"/lib/text/summarize": summarize_lib(), "/lib/bare": bare}
    given: dict[str, Any] = {"text": "{{ inputs.q }}", "words": 12}
    good: dict[str, Any] = {"type": "subgraph", "dag": "/lib/text/summarize", "inputs": given}
    reader = {"type": "llm", "prompt": "{{ nodes.s.output.summary }} {{ nodes.s.output.length }}"}
    assert problems_of(doc_with({"s": good, "t": reader}), lib) == []

    problems = problems_of(
        doc_with(
            {
                "missing": {"type": "subgraph", "dag": "/lib/text/summarize"},
                "extra": {**good, "inputs": {**given, "style": "short"}},
                "typed": {**good, "inputs": {"text": "x", "words": "twelve words"}},
                "literal": {**good, "inputs": {"text": ["not", "a", "string"]}},
                "unknown": {"type": "subgraph", "dag": "/lib/nowhere"},
                "bare": {"type": "subgraph", "dag": "/lib/bare"},
                "s": good,
                "use": {"type": "llm", "prompt": "{{ nodes.s.output.title }}"},
            }
        ),
        lib,
    )
    assert has(problems, "missing", "inputs.text", "requires this input")
    assert has(problems, "extra", "inputs.style", "takes no input 'style'", "text, words")
    assert not [p for p in problems if p.node == "typed"]  # a string is a template
    assert has(problems, "literal", "inputs.text", "expects a string, got a list")
    assert has(problems, "unknown", "dag", "no library subgraph /lib/nowhere")
    assert has(problems, "bare", "dag", "has no signature")
    assert has(problems, "use", "prompt", "has no output 'title'", "length, summary")
    assert len(problems) == 6


def test_subgraph_recursion_is_reported() -> None:
    a = parse_dag(
        {
            "dag": "/lib/a",
            "signature": {"inputs": [], "outputs": ["b"]},
            "nodes": {"b": {"type": "subgraph", "dag": "/lib/b"}},
        }
    )
    b = parse_dag(
        {
            "dag": "/lib/b",
            "signature": {"inputs": [], "outputs": ["a"]},
            "nodes": {"a": {"type": "subgraph", "dag": "/lib/a"}},
        }
    )
    problems = check(a, {"/lib/a": a, "/lib/b": b})
    assert has(problems, "b", "dag", "/lib/a -> /lib/b -> /lib/a")


def test_assert_that_does_not_parse() -> None:
    problems = problems_of(
        doc_with(
            {
                "a": {"type": "assert", "that": "inputs.q ==="},
                "b": {"type": "assert", "that": "inputs.q | no_such_filter"},
                "c": {"type": "assert", "that": "inputs.q }} {% if 1 %}"},
                "d": {"type": "llm", "prompt": "{% if inputs.q %}unclosed"},
            }
        )
    )
    assert has(problems, "a", "that", "does not parse")
    assert has(problems, "b", "that", "does not parse", "no_such_filter")
    assert has(problems, "c", "that", "does not parse")
    assert has(problems, "d", "prompt", "does not parse")
    assert len(problems) == 4


def test_every_problem_is_reported_at_once_with_its_node() -> None:
    doc = {
        "dag": "/lib/planner",
        "inputs": {"topic": {"type": "string"}},
        "budget": {"max_nodes": 2},
        "nodes": {
            "a": {"type": "llm", "prompt": "{{ inputs.nope }}", "model": "gpt-9"},
            "b": {"type": "llm", "prompt": "{{ nodes.c.output }}", "output_schema": {"type": 5}},
            "c": {"type": "llm", "prompt": "{{ nodes.b.output }}", "context": "z"},
            "d": {"type": "assert", "that": "nodes.a.output >"},
        },
    }
    problems = problems_of(doc)
    assert has(problems, None, "signature")
    assert has(problems, None, "budget.max_nodes", "runs 4 nodes")
    assert has(problems, "a", "prompt", "unknown input 'nope'")
    assert has(problems, "a", "model", "unknown model 'gpt-9'")
    assert has(problems, "b", "output_schema.type", "invalid JSON schema")
    assert has(problems, "b", None, "b -> c -> b")
    assert has(problems, "c", "context", "unknown node 'z'")
    assert has(problems, "d", "that", "does not parse")
    assert len(problems) == 8
    with pytest.raises(DagInvalid) as info:
        ensure_valid(parse_dag(doc), known_models=MODELS, known_tags=TAGS)
    assert len(info.value.problems) == 8
    assert {p["node"] for p in info.value.to_list()} == {None, "a", "b", "c", "d"}
    assert "8 problems" in str(info.value)


def partial_of(doc: dict[str, Any]) -> ShapeInvalid:
    with pytest.raises(ShapeInvalid) as info:
        parse_dag(doc)
    return info.value


def test_a_shape_error_does_not_hide_a_cycle_or_an_unknown_model() -> None:
    # the auditor's case: only the type was reported
    doc = {
        "dag": "/dynamic/x",
        "nodes": {
            "a": {"type": "llm", "model": "nope", "prompt": "{{ nodes.b.output }}"},
            "b": {"type": "llm", "tag": "simple", "prompt": "{{ nodes.a.output }}"},
            "c": {"type": "weird", "prompt": "x"},
        },
    }
    error = partial_of(doc)  # parse_dag alone knows no models: the shape and the cycle
    assert has(list(error.problems), "c", "type", "unknown node type 'weird'")
    assert has(list(error.problems), "a", None, "a -> b -> a")
    assert len(error.problems) == 2
    assert set(error.partial.nodes) == {"a", "b"} and set(error.partial.rejected) == {"c"}
    problems = check(error.partial)  # what check_run reports, the shape problem first
    assert problems[0] == error.problems[0]
    assert has(problems, "a", "model", "unknown model 'nope'")
    assert has(problems, "a", None, "a -> b -> a")
    assert len(problems) == 3
    with pytest.raises(DagInvalid) as info:
        ensure_valid(error.partial, known_models=MODELS, known_tags=TAGS)
    assert len(info.value.problems) == 3


def test_a_cycle_through_a_rejected_node_from_its_raw_needs_and_templates() -> None:
    doc = doc_with(
        {
            "x": {"type": "llm", "prompt": "{{ nodes.y.output }}"},
            "y": {"type": "llm", "needs": ["x"]},  # no prompt
            "p": {"type": "llm", "prompt": "{{ nodes.q.output }}"},
            "q": {"type": "assert", "that": "nodes.p.output", "temprature": 1},
        }
    )
    problems = list(partial_of(doc).problems)
    assert has(problems, "y", "prompt", "required")
    assert has(problems, "q", "temprature", "unknown key")
    assert has(problems, "x", None, "x -> y -> x")
    assert has(problems, "p", None, "p -> q -> p")
    assert len(problems) == 4


def test_shape_error_unknown_model_schema_signature_and_budget_together() -> None:
    doc = {
        "dag": "/lib/planner",
        "budget": {"max_nodes": 3},
        "nodes": {
            "a": {"type": "llm", "prompt": "x", "model": "gpt-9", "output_schema": {"type": 5}},
            "b": {"type": "fork", "samples": 2, "prompt": "x", "temprature": 0.5},
            "c": {"type": "llm", "prompt": "{{ nodes.b.output[0] }}", "needs": ["b"]},
            "d": {"type": "llm", "prompt": "more", "context": "b"},
            "e": {"type": "fork", "branches": ["b", "f"]},
            "f": {"type": "llm", "prompt": "y"},
        },
    }
    error = partial_of(doc)
    parsed = list(error.problems)
    assert has(parsed, "b", "temprature", "unknown key")
    assert has(parsed, None, "signature", "must declare a signature")
    assert has(parsed, "a", "output_schema.type", "invalid JSON schema")
    # a, c, d, e, f and at least one for the rejected b: already over max_nodes
    assert has(parsed, None, "budget.max_nodes", "at least 6 nodes", "max_nodes is 3")
    # references to b (needs, template, context, branches) are not "unknown": no noise
    assert not [p for p in parsed if p.node in ("c", "d", "e", "f")]
    assert len(parsed) == 4
    problems = check(error.partial)
    assert has(problems, "a", "model", "unknown model 'gpt-9'")
    assert len(problems) == 5
    assert "5 problems" in str(DagInvalid(problems))


def test_a_rejected_nodes_own_references_are_checked() -> None:
    rejected = {
        "type": "llm",
        "needs": ["ghost"],
        "context": "a",
        "prompt": "{{ nodes.zz.output }} {{ inputs.nope }}",
        "top_p": 7,
    }
    doc = doc_with({"a": {"type": "llm", "prompt": "{{ inputs.q }}"}, "r": rejected})
    problems = list(partial_of(doc).problems)
    assert has(problems, "r", "top_p")
    assert has(problems, "r", "needs", "unknown node 'ghost'", "known: a, r")
    assert has(problems, "r", "prompt", "unknown node 'zz'")
    assert has(problems, "r", "prompt", "unknown input 'nope'")
    assert len(problems) == 4


def test_one_problem_alone_is_reported_as_before() -> None:
    ok = {"type": "llm", "prompt": "{{ inputs.q }}"}
    # one shape error beside valid nodes: that problem only, the same as without partials
    problems = list(partial_of(doc_with({"a": ok, "b": {"type": "llm"}})).problems)
    assert problems == [Problem(node="b", field="prompt", message="required")]
    # no node parsed, or a problem outside the nodes: the shape problems, not a ShapeInvalid
    for doc in (doc_with({"b": {"type": "llm"}}), doc_with({"a": ok}, budget={"wall": 1})):
        with pytest.raises(DagInvalid) as info:
            parse_dag(doc)
        assert not isinstance(info.value, ShapeInvalid) and len(info.value.problems) == 1
    # a valid DAG carries nothing rejected
    spec = parse_dag(doc_with({"a": ok}))
    assert spec.rejected == {} and spec.shape_problems == () and check(spec) == []
    assert parse_dag(spec.document()) == spec


def test_input_defaults_and_binding() -> None:
    spec = parse_dag(
        doc_with(
            {"a": {"type": "llm", "prompt": "{{ inputs.q }} {{ inputs.n }}"}},
            inputs={
                "q": {"type": "string"},
                "n": {"type": "integer", "default": 3},
                "bad": {"type": "integer", "default": "three"},
            },
        )
    )
    assert has(check(spec), None, "inputs.bad.default", "not a integer")
    with pytest.raises(DagInvalid) as info:
        bind_inputs(spec, {"n": True, "zz": 1})
    assert {p.field for p in info.value.problems} == {"inputs.zz", "inputs.n", "inputs.q"}
    assert bind_inputs(spec, {"q": "hi"}) == {"q": "hi", "n": 3, "bad": "three"}


# -- dependencies ---------------------------------------------------------------------------


def test_dependencies_and_levels() -> None:
    spec = load_dag(ISSUE_YAML)
    assert dependencies(spec) == {
        "prefs": set(),
        "ideas": {"prefs"},
        "followup": {"prefs"},
        "check": {"prefs"},
    }
    assert topological_order(spec) == [["prefs"], ["ideas", "followup", "check"]]

    wide = parse_dag(
        doc_with(
            {
                "join": {"type": "llm", "prompt": "{{ nodes.x.output }} {{ nodes.fan.output }}"},
                "x": {"type": "llm", "prompt": "{{ inputs.q }}"},
                "y": {"type": "llm", "prompt": "{{ inputs.q }}"},
                "z": {"type": "llm", "prompt": "more", "context": "x"},
                "fan": {"type": "fork", "branches": ["y", "z"]},
                "ok": {"type": "assert", "that": "nodes.join.output", "needs": ["x"]},
            }
        )
    )
    assert check(wide) == []
    assert dependencies(wide)["fan"] == {"y", "z"}
    assert topological_order(wide) == [["x", "y"], ["z"], ["fan"], ["join"], ["ok"]]


# -- templates ------------------------------------------------------------------------------


def test_render_prompts_from_inputs_and_outputs() -> None:
    env = make_environment()
    scope = make_scope({"request": "museums and food"}, {"prefs": {"interests": ["art", "food"]}})
    text = render(env, "Around {{ nodes.prefs.output.interests | join(', ') }}.\n", scope)
    assert text == "Around art, food.\n"
    assert render(env, "{{ inputs.request | upper }}", scope) == "MUSEUMS AND FOOD"
    with pytest.raises(RenderFailed, match="UndefinedError") as info:
        render(env, "{{ nodes.ideas.output }}", scope, node="later")
    assert info.value.node == "later"
    # a lone expression keeps its type (subgraph inputs); other strings render to text
    assert render_value(env, "{{ nodes.prefs.output.interests }}", scope) == ["art", "food"]
    assert render_value(env, "{{ inputs.request }}!", scope) == "museums and food!"
    assert render_value(env, "{{ 1 }} and {{ 2 }}", scope) == "1 and 2"
    assert render_value(env, 7, scope) == 7
    assert evaluate(env, "nodes.prefs.output.interests | length", scope) == 2


def test_assert_true_and_false_with_values() -> None:
    env = make_environment()
    scope = make_scope({"min": 1}, {"prefs": {"interests": []}})
    check_assert(env, "inputs.min >= 1", scope)
    with pytest.raises(AssertFailed) as info:
        check_assert(
            env, "nodes.prefs.output.interests | length >= inputs.min", scope, node="check"
        )
    failed = info.value
    assert failed.node == "check"
    assert failed.values == {"nodes.prefs.output.interests": "[]", "inputs.min": "1"}
    assert "nodes.prefs.output.interests | length >= inputs.min" in str(failed)
    assert "nodes.prefs.output.interests = []" in str(failed)
    with pytest.raises(AssertFailed, match="could not evaluate") as info:
        check_assert(env, "nodes.missing.output", scope, message="needs the missing node")
    assert info.value.values == {"nodes.missing.output": "<undefined>"}
    assert "needs the missing node" in str(info.value)


def test_sandbox_refuses_unsafe_access() -> None:
    env = make_environment()
    scope = make_scope({"s": "x"}, {"a": ["one"]})
    with pytest.raises(AssertFailed, match="SecurityError"):
        check_assert(env, "''.__class__", scope)
    with pytest.raises(RenderFailed, match="SecurityError"):
        evaluate(env, "''.__class__.__mro__", scope)
    with pytest.raises(RenderFailed, match="SecurityError"):
        render(env, "{{ inputs.s.__class__.__subclasses__() }}", scope)
    with pytest.raises(RenderFailed, match="SecurityError"):
        render(env, "{{ nodes.a.output.append('two') }}", scope)  # outputs are immutable
    with pytest.raises(RenderFailed, match="SecurityError"):
        evaluate(env, "'a' * 10 ** 9", scope)
    with pytest.raises(RenderFailed, match="SecurityError"):
        evaluate(env, "9 ** 99999", scope)
    assert evaluate(env, "2 ** 10", scope) == 1024


@pytest.mark.parametrize(
    ("template", "says"),
    [
        # each took seconds to minutes, or built 100 MB, on the daemon's event loop
        (
            "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}",
            "loops more than",
        ),
        (
            "{% for c in 'x' * 100000 %}{% for d in 'x' * 100000 %}{% endfor %}{% endfor %}",
            "loops more than",
        ),
        ("{{ '%0100000000d' % 1 }}", "'%' with a width"),
        ("{{ '%*d' % (100000000, 1) }}", "'%' with a width"),
        ("{{ '%0100000000d' | format(1) }}", "'format' with a width"),
        ("{{ 'a' | center(100000000) }}", "'center' with a width"),
        ("{{ 'x'.ljust(100000000) }}", "str.ljust with a width"),
        ("{{ '{:>100000000}'.format(1) }}", "str.format with a width"),
        ("{{ '{0:>{1}}'.format(1, 100000000) }}", "str.format with a width"),
        ("{{ ((2 ** 1024) ** 1024) ** 64 > 0 }}", "over 1000000 bits"),
        # what no per-operation bound catches: the template worker's limits do
        ("{{ (['x' * 100000] * 100000) | join }}", "more memory than its sandbox has"),
        ("{{ ([[0] * 100000] * 1000) | sum(start=[]) }}", "took over 2 s"),
        (
            "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
            "{{ f(40) }}",
            "took over 2 s",
        ),
        (
            "{% set __pcrt_metered__ = {}.fromkeys %}"
            "{% for i in range(3000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
            "loops more than",
        ),
    ],
)
def test_the_sandbox_bounds_what_one_template_costs(template: str, says: str) -> None:
    with pytest.raises(RenderFailed, match="SecurityError") as info:
        render(make_environment(), template, {})
    assert says in info.value.reason


def test_a_sandbox_whose_worker_was_killed_renders_on() -> None:
    """A template over the deadline kills the worker process; the next render starts a
    new one, and the daemon's own process never ran the template at all."""
    env = make_environment()
    with pytest.raises(RenderFailed, match="took over"):
        render(
            env,
            "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
            "{% endmacro %}{{ f(40) }}",
            {},
        )
    assert render(env, "{{ inputs.a }} again", {"inputs": {"a": 1}}) == "1 again"
    assert evaluate(env, "(1, 2)", {}) == [1, 2]  # values come back as JSON data


def test_plain_templates_render_here_and_the_rest_in_the_worker() -> None:
    """Lookups, cheap filters, tests and ifs cost what their inputs cost: they render in
    this process, with no round trip. Anything else goes to the worker."""
    env = make_environment()
    scope = make_scope({"a": "hi", "b": 2}, {"x": ["p", "q"]})
    text = (
        "Say {{ inputs.a | upper }} {{ nodes.x.output | join('+') }}{% if inputs.b %}!{% endif %}"
    )
    assert render(env, text, scope) == "Say HI p+q!"
    check_assert(env, "inputs.b > 1 and nodes.x.output | length == 2", scope)
    assert evaluate(env, "nodes.x.output[0] ~ inputs.a", scope) == "phi"
    assert env.worker is not None and not env.worker.running
    assert render(env, "{% for i in range(2) %}{{ i }}{% endfor %}", scope) == "01"
    assert env.worker.running
    with pytest.raises(AssertFailed, match="inputs.b = 2"):
        check_assert(env, "inputs.b * 1 > 5", scope)  # '*': not plain, checked there


def test_bounded_templates_still_do_what_they_say() -> None:
    """The bounds leave ordinary templates alone: loops up to the limit, widths and
    numbers that are only printed, and formats that pad a little."""
    env = make_environment()
    many = "{% for i in range(1000) %}{% for j in range(999) %}{% endfor %}{% endfor %}ok"
    assert render(env, many, {}) == "ok"  # 1,000 + 999,000 steps: exactly the limit
    text = (
        "{{ '%05d' % 3 }} {{ 'a' | center(5) }} {{ '{:>4}'.format(7) }} {{ '%d' % 10 ** 9 }} "
        "{{ '{}'.format(10 ** 9) }} {% for x in [1, 2] %}{{ loop.index }}{% endfor %}"
    )
    assert render(env, text, {}) == "00003   a      7 1000000000 1000000000 12"
    assert evaluate(env, "(2 ** 1024) ** 2 > 0", {})


def test_a_dag_has_at_most_a_thousand_nodes() -> None:
    nodes = {f"n{i}": {"type": "assert", "that": "true"} for i in range(1001)}
    with pytest.raises(DagInvalid, match="at most 1000 nodes; this one has 1001"):
        parse_dag({"dag": "/dynamic/wide", "nodes": nodes})
    parse_dag({"dag": "/dynamic/wide", "nodes": dict(list(nodes.items())[:1000])})
