"""Agent DAGs: the document format, its parsing and validation. Running them is
``runner.DagRunner``'s, imported from its module (it loads the engine, which these do not).

load_dag(path_or_text) / parse_dag(obj)   -> DagSpec        (shape; DagInvalid)
validate(spec, known_models=..., ...)     -> list[Problem]  (semantics, all at once)
dependencies(spec), topological_order(spec)                 (what runs when)
make_environment(), render(), check_assert()                (the Jinja2 sandbox)
"""

from __future__ import annotations

from pcrt.runtime.dag.load import load_dag, parse_dag
from pcrt.runtime.dag.spec import (
    AssertNode,
    Budget,
    DagSpec,
    ForkNode,
    InputSpec,
    LlmNode,
    Node,
    OutputSpec,
    Signature,
    SubgraphNode,
)
from pcrt.runtime.dag.template_render import check_assert, evaluate, render, render_value
from pcrt.runtime.dag.templates import make_environment, make_scope
from pcrt.runtime.dag.validate import (
    bind_inputs,
    count_nodes,
    dependencies,
    ensure_valid,
    topological_order,
    validate,
)

__all__ = [
    "AssertNode",
    "Budget",
    "DagSpec",
    "ForkNode",
    "InputSpec",
    "LlmNode",
    "Node",
    "OutputSpec",
    "Signature",
    "SubgraphNode",
    "bind_inputs",
    "check_assert",
    "count_nodes",
    "dependencies",
    "ensure_valid",
    "evaluate",
    "load_dag",
    "make_environment",
    "make_scope",
    "parse_dag",
    "render",
    "render_value",
    "topological_order",
    "validate",
]
