"""DAG semantics as pure functions: validation, dependencies and execution levels.

``validate`` reports every problem at once, each naming its node, so that one round of
fixes (by a person or by the agent that generated the DAG) is enough. It reads templates'
ASTs rather than rendering them, and asks only the sets of model names and tags and the
library of ``/lib`` subgraphs it is given: no I/O, no engine.

Decisions where the issue is silent:

- ``max_nodes`` counts node executions: every node counts one, except a fork of N samples
  (N generations) and a subgraph (the node count of the DAG it calls, recursively); a fork
  with branches counts one, and its branches count on their own. A DAG whose count exceeds
  ``max_nodes`` can never finish, so it is refused. ``max_tokens`` and ``timeout_sec`` are
  run-time limits: a generation may stop early, so no static count can prove them unmet.
- ``context`` must name an ``llm`` node (a fork has several continuations, none canonical);
  a node that continues a context keeps its parent's chat, so it takes no ``system``, and
  it must not name a different model than its parent.
- Reads of ``nodes.X.output.FIELD`` are checked against what X produces: a subgraph's
  signature outputs; an ``llm`` node without a schema produces text (only ``str`` methods);
  a fork produces a list (index it); a schema with ``additionalProperties: false`` lists
  its fields.
- Templates read nodes by constant ids only (``nodes.ID`` or ``nodes['ID']``): a computed
  id (``nodes[name]``) would hide a dependency, so it is a problem.
- The branches of one fork must not depend on one another: they run side by side.
- A ``/lib`` DAG's interface is its signature: an entry of ``inputs`` that the signature
  does not declare could never be given by a caller, so it is a problem.
- A partial DAG (some nodes failed their shape check, ``DagSpec.rejected``) is checked as
  far as it can be: its shape problems first, then everything about the nodes that parsed;
  the rejected nodes' well-formed ``needs``, ``context``, ``branches`` and template strings
  still count for cycles and unknown references, and each counts one toward ``max_nodes``.
  A reference to a rejected node is not "unknown": its own problem is already reported.
- ``validate_document`` is ``validate`` without the models, tags and library (what
  ``parse_dag`` can check on its own): the checks that need them are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from jinja2.exceptions import TemplateSyntaxError
from jsonschema.validators import Draft202012Validator, validator_for

from pcrt.runtime.dag.spec import (
    AgentNode,
    AssertNode,
    DagSpec,
    ForkNode,
    InputSpec,
    LlmNode,
    Node,
    SubgraphNode,
    ToolNode,
)
from pcrt.runtime.dag.templates import (
    DagSandbox,
    Reference,
    TemplateInfo,
    make_environment,
    scan_expression,
    scan_template,
)
from pcrt.runtime.engine.constraints import constraint_of
from pcrt.runtime.engine.grammar_compiler import check_compiles
from pcrt.runtime.errors import ConstraintInvalid, DagInvalid, Problem

__all__ = [
    "bind_inputs",
    "count_nodes",
    "dependencies",
    "ensure_valid",
    "find_cycles",
    "schema_problems",
    "template_fields",
    "topological_order",
    "validate",
    "validate_callees",
    "validate_document",
]

_LISTED = 10  # names listed in an "unknown X (known: ...)" message


def validate(
    spec: DagSpec,
    *,
    known_models: set[str],
    known_tags: set[str],
    library: Mapping[str, DagSpec] | None = None,
    known_tools: set[str] | None = None,
) -> list[Problem]:
    """Every problem of ``spec``, in document order; an empty list means it may run.
    ``known_tools``: the registered tools (None: not known here, so not checked)."""
    return _Validator(spec, known_models, known_tags, library or {}, known_tools).run()


def validate_document(spec: DagSpec) -> list[Problem]:
    """``validate`` without knowing the models, tags or library: what ``parse_dag`` reports
    with the shape problems of a partial DAG."""
    return _Validator(spec, None, None, None).run()


def ensure_valid(
    spec: DagSpec,
    *,
    known_models: set[str],
    known_tags: set[str],
    library: Mapping[str, DagSpec] | None = None,
) -> DagSpec:
    """``validate`` for callers that want an exception (``DagInvalid``, HTTP 422)."""
    problems = validate(spec, known_models=known_models, known_tags=known_tags, library=library)
    if problems:
        raise DagInvalid(problems, source=spec.dag)
    return spec


def validate_callees(
    callees: Iterable[DagSpec],
    *,
    known_models: set[str],
    known_tags: set[str],
    library: Mapping[str, DagSpec],
) -> list[Problem]:
    """The problems of the library DAGs a run calls, each on its node's path
    (``/lib/x/node``) or the callee's path. Recursion is left out: the caller's own
    validation reports every recursion it can reach, on the node that leads there."""
    found: list[Problem] = []
    for callee in callees:
        problems = validate(
            callee, known_models=known_models, known_tags=known_tags, library=library
        )
        for problem in problems:
            if problem.field == "dag" and problem.message.startswith("subgraph recursion"):
                continue
            where = callee.dag
            if problem.node is not None:
                node = callee.nodes.get(problem.node)
                where = node.path if node is not None else f"{callee.dag}/{problem.node}"
            found.append(dataclasses.replace(problem, node=where))
    return found


def template_fields(node: Node) -> list[tuple[str, str, bool]]:
    """A node's templated fields as (field, source, is_expression)."""
    if isinstance(node, AssertNode):
        return [("that", node.that, True)]
    if isinstance(node, SubgraphNode):
        return [(f"inputs.{k}", v, False) for k, v in node.inputs.items() if isinstance(v, str)]
    if isinstance(node, ToolNode):
        return [
            (f"arguments.{k}", v, False) for k, v in node.arguments.items() if isinstance(v, str)
        ]
    fields = [("prompt", node.prompt, False), ("system", node.system, False)]
    return [(name, source, False) for name, source, _ in fields if source is not None]


def _raw_fields(raw: Any) -> list[tuple[str, str, bool]]:
    """A rejected node's template strings, whatever its type: prompt, system, that (an
    expression) and string inputs."""
    if not isinstance(raw, Mapping):
        return []
    fields = [(k, raw.get(k), k == "that") for k in ("prompt", "system", "that")]
    for name in ("inputs", "arguments"):
        values = raw.get(name)
        if isinstance(values, Mapping):
            fields += [(f"{name}.{k}", v, False) for k, v in values.items()]
    return [
        (str(field), source, is_expr)
        for field, source, is_expr in fields
        if isinstance(source, str)
    ]


def _raw_edges(raw: Any) -> list[tuple[str, str]]:
    """A rejected node's well-formed ``needs``, ``context`` and ``branches`` as (field, id)."""
    if not isinstance(raw, Mapping):
        return []
    edges = [("context", raw["context"])] if isinstance(raw.get("context"), str) else []
    for field in ("needs", "branches"):
        if isinstance(raw.get(field), list | tuple):
            edges += [(field, target) for target in raw[field] if isinstance(target, str)]
    return edges


def _scan_fields(
    fields: list[tuple[str, str, bool]], env: DagSandbox
) -> list[tuple[str, TemplateInfo | TemplateSyntaxError]]:
    scanned: list[tuple[str, TemplateInfo | TemplateSyntaxError]] = []
    for field, source, is_expression in fields:
        try:
            info = scan_expression(env, source) if is_expression else scan_template(env, source)
        except TemplateSyntaxError as exc:
            scanned.append((field, exc))
        else:
            scanned.append((field, info))
    return scanned


def _explicit_edges(node: Node) -> list[str]:
    edges = list(node.needs)
    if isinstance(node, LlmNode | ForkNode):
        if node.context is not None:
            edges.append(node.context)
        if isinstance(node, ForkNode) and node.branches:
            edges.extend(node.branches)
    return edges


def dependencies(spec: DagSpec) -> dict[str, set[str]]:
    """For each node, the nodes it waits for: template reads, ``needs``, ``context`` and
    ``branches``. Names of unknown nodes are left out (``validate`` reports them). A partial
    DAG's rejected nodes are in, with what their raw documents read."""
    env = make_environment()
    parts = {i: (_explicit_edges(n), template_fields(n)) for i, n in spec.nodes.items()}
    for node_id, raw in spec.rejected.items():
        parts[node_id] = ([target for _, target in _raw_edges(raw)], _raw_fields(raw))
    deps: dict[str, set[str]] = {}
    for node_id, (edges, fields) in parts.items():
        wanted = set(edges)
        for _, info in _scan_fields(fields, env):
            if isinstance(info, TemplateInfo):
                wanted |= info.node_ids()
        deps[node_id] = {d for d in wanted if d in parts}
    return deps


def find_cycles(deps: Mapping[str, set[str]]) -> list[list[str]]:
    """Dependency cycles, each as its nodes in order (each needs the next, the last the
    first), starting at the node first in ``deps``' order. One cycle per tangle at least."""
    order = {node: i for i, node in enumerate(deps)}
    remaining = set(deps)
    changed = True
    while changed:  # peel off nodes whose dependencies are all outside any cycle
        changed = False
        for node in list(remaining):
            if not deps[node] & remaining:
                remaining.discard(node)
                changed = True
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(remaining, key=order.__getitem__):
        walk: list[str] = []
        position: dict[str, int] = {}
        node = start
        while node not in position:
            position[node] = len(walk)
            walk.append(node)
            node = min(deps[node] & remaining, key=order.__getitem__)
        cycle = walk[position[node] :]
        if frozenset(cycle) in seen:
            continue
        seen.add(frozenset(cycle))
        first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
        cycles.append(cycle[first:] + cycle[:first])
    return cycles


def topological_order(spec: DagSpec) -> list[list[str]]:
    """Levels of node ids: every node's dependencies are in earlier levels, so the nodes of
    one level can run at the same time. Within a level, document order. A cycle raises
    ``DagInvalid``."""
    deps = dependencies(spec)
    cycles = find_cycles(deps)
    if cycles:
        raise DagInvalid([_cycle_problem(c) for c in cycles], source=spec.dag)
    done: set[str] = set()
    levels: list[list[str]] = []
    while len(done) < len(deps):
        level = [n for n in deps if n not in done and deps[n] <= done]
        levels.append(level)
        done.update(level)
    return levels


def count_nodes(spec: DagSpec, library: Mapping[str, DagSpec] | None = None) -> int:
    """How many node executions a run takes (see the module docstring); subgraphs whose DAG
    is unknown or recursive count one."""
    return _count(spec, library or {}, (spec.dag,), [])


def _count(
    spec: DagSpec,
    library: Mapping[str, DagSpec],
    stack: tuple[str, ...],
    recursions: list[tuple[str, tuple[str, ...]]],
) -> int:
    total = 0
    for node_id, node in spec.nodes.items():
        if isinstance(node, ForkNode) and node.samples is not None:
            total += node.samples
        elif isinstance(node, SubgraphNode):
            callee = library.get(node.dag)
            if callee is None:
                total += 1
            elif node.dag in stack:
                recursions.append((node_id, (*stack, node.dag)))
                total += 1
            else:
                deeper: list[tuple[str, tuple[str, ...]]] = []
                total += _count(callee, library, (*stack, node.dag), deeper)
                # a recursion further down is reported on the node of this DAG that leads there
                recursions.extend((node_id, chain) for _, chain in deeper[:1])
        else:
            total += 1
    return total


def schema_problems(schema: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Errors of a JSON schema against its meta-schema (Draft 2020-12 unless ``$schema``
    says otherwise), as (location inside the schema, message)."""
    cls = validator_for(schema, default=Draft202012Validator)
    checker = cls(cls.META_SCHEMA)
    found = []
    for error in sorted(checker.iter_errors(schema), key=lambda e: list(map(str, e.path))):
        found.append((".".join(str(p) for p in error.path), error.message))
    return found


def bind_inputs(spec: DagSpec, values: Mapping[str, Any]) -> dict[str, Any]:
    """A run's inputs: the values given, checked against the declared types, defaults
    filled in. Unknown, missing or mistyped inputs raise ``DagInvalid``, all at once."""
    declared = spec.input_specs
    problems = [
        Problem(field=f"inputs.{name}", message=f"unknown input{_known(declared)}")
        for name in values
        if name not in declared
    ]
    bound: dict[str, Any] = {}
    for name, decl in declared.items():
        if name in values:
            value = values[name]
            if not _type_ok(value, decl.type):
                problems.append(
                    Problem(
                        field=f"inputs.{name}",
                        message=f"expected {decl.type}, got {type(value).__name__}",
                    )
                )
            bound[name] = value
        elif decl.required:
            problems.append(Problem(field=f"inputs.{name}", message="required input not given"))
        else:
            bound[name] = decl.default
    if problems:
        raise DagInvalid(problems, source=spec.dag)
    return bound


class _Validator:
    """One validation pass; collects problems instead of stopping at the first."""

    def __init__(
        self,
        spec: DagSpec,
        known_models: set[str] | None,
        known_tags: set[str] | None,
        library: Mapping[str, DagSpec] | None,
        known_tools: set[str] | None = None,
    ) -> None:
        """None for models, tags, library or tools: not known here, so not checked."""
        self.known_tools = known_tools
        self.spec = spec
        self.ids = [*spec.nodes, *spec.rejected]  # what a reference may name
        self.known_models = known_models
        self.known_tags = known_tags
        self.library = library
        self.env = make_environment()
        self.problems: list[Problem] = list(spec.shape_problems)
        self.constrainable: set[str] = set()  # keys of output schemas that compile

    def add(self, node: str | None, field: str | None, message: str) -> None:
        self.problems.append(Problem(node=node, field=field, message=message))

    def run(self) -> list[Problem]:
        self.check_document()
        paths: dict[str, str] = {}
        for node_id, node in self.spec.nodes.items():
            if node.id != node_id:
                self.add(node_id, "id", f"the id {node.id!r} differs from the node's key")
            if node.path in paths:
                self.add(
                    node_id, "path", f"the path {node.path} is also node {paths[node.path]!r}'s"
                )
            paths.setdefault(node.path, node_id)
            self.check_edges(node_id, node)
            if isinstance(node, LlmNode | ForkNode):
                self.check_generation(node_id, node)
            if isinstance(node, SubgraphNode):
                self.check_subgraph(node_id, node)
            if isinstance(node, ToolNode):
                self.check_tool(node_id, "tool", node.tool)
            if isinstance(node, AgentNode):
                self.check_agent(node_id, node)
            for field, info in _scan_fields(template_fields(node), self.env):
                self.check_template(node_id, field, info)
        for node_id, raw in self.spec.rejected.items():
            for field, target in _raw_edges(raw):
                if target not in self.ids:
                    self.add(node_id, field, f"unknown node {target!r}{_known(self.ids)}")
            for field, info in _scan_fields(_raw_fields(raw), self.env):
                self.check_template(node_id, field, info)
        self.check_signature_outputs()
        deps = dependencies(self.spec)
        for cycle in find_cycles(deps):
            self.problems.append(_cycle_problem(cycle))
        self.check_branches(deps)
        self.check_budget()
        return self.problems

    # -- the document -------------------------------------------------------------------

    def check_document(self) -> None:
        spec = self.spec
        if spec.is_library and spec.signature is None:
            self.add(
                None,
                "signature",
                "a /lib subgraph must declare a signature: {inputs: ..., outputs: ...}",
            )
        if spec.signature is not None:
            for name in spec.inputs:
                if name not in spec.signature.inputs:
                    self.add(
                        None,
                        f"inputs.{name}",
                        "not in the signature's inputs, so no caller can give it",
                    )
            for name, decl in spec.signature.inputs.items():
                self.check_default(f"signature.inputs.{name}", decl)
        for name, decl in spec.inputs.items():
            self.check_default(f"inputs.{name}", decl)

    def check_default(self, field: str, decl: InputSpec) -> None:
        if not decl.required and decl.default is not None and not _type_ok(decl.default, decl.type):
            self.add(
                None,
                f"{field}.default",
                f"the default is a {type(decl.default).__name__}, not a {decl.type}",
            )

    def check_signature_outputs(self) -> None:
        signature = self.spec.signature
        if signature is None:
            return
        for name, out in signature.outputs.items():
            field = f"signature.outputs.{name}"
            if out.value is None:
                if name not in self.ids:
                    self.add(
                        None,
                        field,
                        f"no value given and there is no node {name!r} to take it from",
                    )
                continue
            try:
                info = scan_expression(self.env, out.value)
            except TemplateSyntaxError as exc:
                self.check_template(None, f"{field}.value", exc)
            else:
                self.check_template(None, f"{field}.value", info)

    # -- one node -----------------------------------------------------------------------

    def check_edges(self, node_id: str, node: Node) -> None:
        for need in node.needs:
            if need not in self.ids:
                self.add(node_id, "needs", f"unknown node {need!r}{_known(self.ids)}")
        if isinstance(node, ForkNode) and node.branches is not None:
            seen: set[str] = set()
            for branch in node.branches:
                if branch not in self.ids:
                    self.add(node_id, "branches", f"unknown node {branch!r}{_known(self.ids)}")
                elif branch in seen:
                    self.add(node_id, "branches", f"{branch!r} is listed twice")
                seen.add(branch)

    def check_generation(self, node_id: str, node: LlmNode | ForkNode) -> None:
        models, tags = self.known_models, self.known_tags
        if node.model is not None and models is not None and node.model not in models:
            self.add(node_id, "model", f"unknown model {node.model!r}{_known(models)}")
        if node.tag is not None and tags is not None and node.tag not in tags:
            self.add(node_id, "tag", f"unknown tag {node.tag!r}{_known(tags)}")
        if node.output_schema is not None:
            problems = schema_problems(node.output_schema)
            for where, message in problems:
                field = f"output_schema.{where}" if where else "output_schema"
                self.add(node_id, field, f"invalid JSON schema: {message}")
            if not problems:
                self.check_constrainable(node_id, node.output_schema)
        if node.context is not None:
            self.check_context(node_id, node, node.context)

    def check_tool(self, node_id: str, field: str, name: str) -> None:
        tools = self.known_tools
        if tools is not None and name not in tools:
            listed = (
                f"{_known(tools)}"
                if tools
                else " (no tools are registered: see [tools] in the config file)"
            )
            self.add(node_id, field, f"no tool {name!r}{listed}")

    def check_agent(self, node_id: str, node: AgentNode) -> None:
        models, tags = self.known_models, self.known_tags
        if node.model is not None and models is not None and node.model not in models:
            self.add(node_id, "model", f"unknown model {node.model!r}{_known(models)}")
        if node.tag is not None and tags is not None and node.tag not in tags:
            self.add(node_id, "tag", f"unknown tag {node.tag!r}{_known(tags)}")
        for i, name in enumerate(node.tools):
            self.check_tool(node_id, f"tools[{i}]", name)
        if len(set(node.tools)) < len(node.tools):
            self.add(node_id, "tools", "a tool is listed twice")
        if node.tool_choice not in ("auto", "required", *node.tools):
            self.add(
                node_id,
                "tool_choice",
                f"{node.tool_choice!r} is none of auto, required or the node's tools",
            )
        forever = node.tool_choice != "auto" and not node.reset_tool_choice
        if forever and node.max_tool_calls is None:
            self.add(
                node_id,
                "reset_tool_choice",
                f"tool_choice {node.tool_choice!r} on every step never lets it answer: set "
                "max_tool_calls (it answers once they are spent)",
            )
        for field in ("output_schema", "context"):
            if getattr(node, field) is not None:
                self.add(node_id, field, f"an agent node takes no {field} (its answer is text)")

    def check_constrainable(self, node_id: str, schema: dict[str, Any]) -> None:
        """A valid schema that constrained decoding cannot take (an unsupported keyword or
        format, over the bounds) fails the DAG here, not its run at that node."""
        try:
            constraint = constraint_of(schema, None)
            assert constraint is not None
            if constraint.key not in self.constrainable:  # many nodes, one schema: once
                check_compiles(constraint)
                self.constrainable.add(constraint.key)
        except ConstraintInvalid as exc:
            field = f"output_schema.{exc.where}" if exc.where else "output_schema"
            self.add(node_id, field, exc.why)

    def check_context(self, node_id: str, node: LlmNode | ForkNode, parent_id: str) -> None:
        parent = self.spec.nodes.get(parent_id)
        if parent is None:
            if parent_id not in self.ids:
                self.add(node_id, "context", f"unknown node {parent_id!r}{_known(self.ids)}")
            return
        if parent_id == node_id:
            return  # reported as a cycle
        if not isinstance(parent, LlmNode):
            self.add(
                node_id,
                "context",
                f"a context continues an llm node's KV; {parent_id!r} is a {parent.type} node",
            )
            return
        if node.system is not None:
            self.add(
                node_id,
                "system",
                f"a node that continues {parent_id!r}'s context keeps its system prompt",
            )
        for attr in ("model", "tag"):
            mine, theirs = getattr(node, attr), getattr(parent, attr)
            if mine is not None and theirs is not None and mine != theirs:
                self.add(
                    node_id,
                    attr,
                    f"{attr} {mine!r} differs from {theirs!r} of {parent_id!r}, whose KV it "
                    f"continues",
                )

    def check_subgraph(self, node_id: str, node: SubgraphNode) -> None:
        if self.library is None:
            return
        callee = self.library.get(node.dag)
        if callee is None:
            self.add(node_id, "dag", f"no library subgraph {node.dag}{_known(self.library)}")
            return
        if callee.signature is None:
            self.add(node_id, "dag", f"{node.dag} has no signature, so it cannot be called")
            return
        declared = callee.signature.inputs
        for name, value in node.inputs.items():
            decl = declared.get(name)
            if decl is None:
                self.add(
                    node_id,
                    f"inputs.{name}",
                    f"{node.dag} takes no input {name!r}{_known(declared)}",
                )
            elif not isinstance(value, str) and not _type_ok(value, decl.type):
                self.add(
                    node_id,
                    f"inputs.{name}",
                    f"{node.dag} expects a {decl.type}, got a {type(value).__name__}",
                )
        for name, decl in declared.items():
            if decl.required and name not in node.inputs:
                self.add(node_id, f"inputs.{name}", f"{node.dag} requires this input")

    # -- templates ------------------------------------------------------------------------

    def check_template(
        self, node_id: str | None, field: str, info: TemplateInfo | TemplateSyntaxError
    ) -> None:
        if isinstance(info, TemplateSyntaxError):
            line = f" at line {info.lineno}" if info.lineno and info.lineno > 1 else ""
            self.add(node_id, field, f"does not parse{line}: {info.message}")
            return
        for name in sorted(info.other_names):
            self.add(
                node_id,
                field,
                f"unknown name {name!r}: templates read inputs.NAME and nodes.ID.output",
            )
        for ref in info.references:
            message = self.reference_problem(node_id, ref)
            if message is not None:
                self.add(node_id, field, message)

    def reference_problem(self, node_id: str | None, ref: Reference) -> str | None:
        if ref.root == "inputs":
            if not ref.path:
                return None
            if ref.name is None or ref.name not in self.spec.input_specs:
                return f"unknown input {ref.path[0]!r}{_known(self.spec.input_specs)}"
            return None
        if ref.name is None:
            return (
                f"{ref.text}: read nodes by a constant id (nodes.ID.output), so that the "
                f"dependency is known before the run"
            )
        target = self.spec.nodes.get(ref.name)
        if target is None:
            return None if ref.name in self.ids else f"unknown node {ref.name!r}{_known(self.ids)}"
        if len(ref.path) < 2:
            return None
        if ref.path[1] != "output":
            return f"{ref.text}: a node exposes only .output (nodes.{ref.name}.output)"
        if len(ref.path) < 3 or not isinstance(ref.path[2], str):
            return None
        return self.output_field_problem(ref, target, ref.path[2])

    def output_field_problem(self, ref: Reference, target: Node, field: str) -> str | None:
        name = ref.name
        if isinstance(target, SubgraphNode):
            callee = (self.library or {}).get(target.dag)
            if callee is None or callee.signature is None or hasattr(dict, field):
                return None  # the unknown callee is reported on its own node
            outputs = callee.signature.outputs
            if field not in outputs:
                return f"{ref.text}: {target.dag} has no output {field!r}{_known(outputs)}"
            return None
        if isinstance(target, ForkNode):
            if hasattr(list, field):
                return None
            return (
                f"{ref.text}: the output of fork {name!r} is a list, one item per "
                f"{'sample' if target.samples is not None else 'branch'} "
                f"(nodes.{name}.output[0])"
            )
        if isinstance(target, AgentNode) and not hasattr(str, field):
            return f"{ref.text}: {name!r} is an agent node, whose output is text"
        if isinstance(target, LlmNode):
            schema = target.output_schema
            if schema is None:
                if hasattr(str, field):
                    return None
                return (
                    f"{ref.text}: {name!r} has no output_schema, so its output is text "
                    f"without fields"
                )
            properties = schema.get("properties")
            if (
                schema.get("type") == "object"
                and isinstance(properties, dict)
                and schema.get("additionalProperties") is False
                and field not in properties
                and not hasattr(dict, field)
            ):
                return f"{ref.text}: {name!r}'s output_schema has no property {field!r}"
        return None

    # -- the graph ------------------------------------------------------------------------

    def check_branches(self, deps: Mapping[str, set[str]]) -> None:
        for node_id, node in self.spec.nodes.items():
            if not isinstance(node, ForkNode) or not node.branches:
                continue
            branches = [b for b in dict.fromkeys(node.branches) if b in deps and b != node_id]
            for branch in branches:
                upstream = _closure(deps, branch)
                for other in branches:
                    if other != branch and other in upstream:
                        self.add(
                            node_id,
                            "branches",
                            f"branch {branch!r} needs branch {other!r}; branches run side by "
                            f"side, so they must be independent",
                        )

    def check_budget(self) -> None:
        recursions: list[tuple[str, tuple[str, ...]]] = []
        total = _count(self.spec, self.library or {}, (self.spec.dag,), recursions)
        total += len(self.spec.rejected)  # every node runs one at least
        for node_id, chain in recursions:
            self.add(node_id, "dag", f"subgraph recursion: {' -> '.join(chain)}")
        limit = self.spec.budget.max_nodes
        if limit is not None and total > limit:
            least = "at least " if self.spec.rejected else ""
            self.add(
                None,
                "budget.max_nodes",
                f"the DAG runs {least}{total} nodes (a fork's samples count one each, a "
                f"subgraph its nodes) but max_nodes is {limit}",
            )


def _cycle_problem(cycle: list[str]) -> Problem:
    text = " -> ".join([*cycle, cycle[0]])
    return Problem(
        node=cycle[0], field=None, message=f"dependency cycle: {text} (each needs the next)"
    )


def _closure(deps: Mapping[str, set[str]], start: str) -> set[str]:
    """Every node ``start`` waits for, directly or not."""
    seen: set[str] = set()
    stack = list(deps.get(start, ()))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(deps.get(node, ()))
    return seen


def _type_ok(value: Any, json_type: str) -> bool:
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if json_type == "array":
        return isinstance(value, list | tuple)
    if json_type == "object":
        return isinstance(value, dict)
    return True


def _known(names: Iterable[str]) -> str:
    listed = sorted(names)
    if not listed:
        return ""
    shown = ", ".join(listed[:_LISTED])
    more = f", ... ({len(listed) - _LISTED} more)" if len(listed) > _LISTED else ""
    return f" (known: {shown}{more})"
