"""The DAG document as frozen pydantic models: shape only, no semantics.

A DAG document names itself by path (``/dynamic/...`` for generated or one-off plans,
``/lib/...`` for reusable subgraphs), declares its inputs, a budget, optionally a signature
(required under ``/lib``) and its nodes. Node types are a closed whitelist, parsed as a
union discriminated on ``type``; unknown keys are errors everywhere, so a typo fails loudly
instead of being ignored. Cross-node rules (references, cycles, models, budget) live in
``validate.py``, which needs to know the models and the library (``library.py``). One
rewrite lives here, since it is about fields only: how a subgraph call hands its routing
hints to the callee's nodes (``DagSpec.called_with``).

Each node carries its ``id`` (its key in ``nodes``) and its ``path`` (the DAG's path plus
``/`` plus the id unless given): both are filled in while parsing.

When some nodes fail their shape check, ``parse_dag`` still builds the DAG of the others, to
validate it (never to run it): that partial DAG carries the failed nodes' raw documents
(``rejected``) and their problems (``shape_problems``), which ``validate`` reports first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pcrt.runtime.errors import Problem

__all__ = [
    "AgentNode",
    "AssertNode",
    "Budget",
    "Complexity",
    "DagSpec",
    "ForkNode",
    "GENERATION_FIELDS",
    "InputSpec",
    "JsonType",
    "LlmNode",
    "NODE_TYPES",
    "Node",
    "OutputSpec",
    "Route",
    "Signature",
    "SubgraphNode",
    "ToolNode",
    "tools_called",
]

IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
MAX_NODES = 1_000  # in one DAG document (a subgraph call counts as one)
# /lib/... or /dynamic/..., segments of letters, digits, '_', '-', '.'
PATH_PATTERN = r"^/(lib|dynamic)(/[A-Za-z0-9_.-]+)+$"
LIB_PATTERN = r"^/lib(/[A-Za-z0-9_.-]+)+$"

NODE_TYPES: tuple[str, ...] = ("llm", "fork", "assert", "subgraph", "tool", "agent")
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name

JsonType = Literal["string", "integer", "number", "boolean", "array", "object"]
# routing hints of a node that generates or calls: "auto" and None mean "not set"
Route = Literal["local", "peer", "auto"]
Complexity = Literal["low", "medium", "high"]

_Ident = Annotated[str, Field(pattern=IDENT_PATTERN)]
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class InputSpec(BaseModel):
    """One declared input. It is required unless a ``default`` is given (null counts)."""

    model_config = _FROZEN

    type: JsonType = "string"
    description: str = ""
    default: Any = None

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


class OutputSpec(BaseModel):
    """One output of a signature.

    ``value`` is a Jinja2 expression over ``inputs`` and ``nodes`` evaluated when the
    subgraph has finished; without it the output is the output of the node of that name.
    """

    model_config = _FROZEN

    type: JsonType | None = None
    description: str = ""
    value: str | None = None


def _names_to_mapping(value: Any) -> Any:
    """Allow ``[a, b]`` as shorthand for ``{a: {}, b: {}}`` in a signature."""
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return {name: {} for name in value}
    return value


class Signature(BaseModel):
    """The interface of a reusable subgraph: what callers give and what they get back."""

    model_config = _FROZEN

    inputs: dict[_Ident, InputSpec] = {}
    outputs: dict[_Ident, OutputSpec] = {}

    @field_validator("inputs", "outputs", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _names_to_mapping(value)


class Budget(BaseModel):
    """Limits of one run; None means no limit. Only ``max_nodes`` can be checked statically."""

    model_config = _FROZEN

    max_nodes: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_sec: float | None = Field(default=None, gt=0)  # tool calls' time counts too
    max_tool_calls: int | None = Field(default=None, ge=1)  # by tool and agent nodes


class _NodeBase(BaseModel):
    model_config = _FROZEN

    id: _Ident
    path: str = Field(pattern=PATH_PATTERN)
    description: str = ""
    needs: tuple[str, ...] = ()


# the fields of a generation; a fork with ``branches`` must set none of them
GENERATION_FIELDS: frozenset[str] = frozenset(
    {
        "prompt",
        "system",
        "model",
        "tag",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "max_tokens",
        "stop",
        "output_schema",
        "context",
        "checkpoint_every",
    }
)


class _Generation(_NodeBase):
    """What one generation needs. Unset sampling fields take the engine's defaults."""

    prompt: str | None = Field(default=None, min_length=1)
    system: str | None = None
    model: str | None = Field(default=None, min_length=1)
    tag: str | None = Field(default=None, min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    output_schema: dict[str, Any] | None = None
    context: str | None = None
    cache: bool = True
    route: Route = "auto"
    complexity: Complexity | None = None
    checkpoint_every: int = Field(default=128, ge=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _model_or_tag(self) -> _Generation:
        if self.model is not None and self.tag is not None:
            raise ValueError("give model or tag, not both")
        return self

    def sampling(self) -> dict[str, Any]:
        """The sampling fields this node sets, named as the engine's ``SamplingParams``."""
        names = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")
        params: dict[str, Any] = {
            n: getattr(self, n) for n in names if getattr(self, n) is not None
        }
        if self.stop:
            params["stop"] = self.stop
        if self.output_schema is not None:
            params["json_schema"] = self.output_schema
        return params


class LlmNode(_Generation):
    """One generation. With ``output_schema`` decoding is constrained and the output is JSON.

    ``context`` names an upstream ``llm`` node whose KV state (prompt and output) this node
    continues: its ``prompt`` is appended as the next user turn instead of a fresh chat.
    """

    type: Literal["llm"]
    prompt: str = Field(min_length=1)

    @property
    def generates(self) -> Literal[True]:
        """Whether running the node is one generation of its own: the one place that
        says which nodes generate (a ``Literal`` where the type alone answers, so that a
        check of it narrows a ``Node`` to ``LlmNode | ForkNode``)."""
        return True


class ForkNode(_Generation):
    """Work side by side: ``samples`` continuations of one prompt (one prefill), or the
    ``branches`` named (other nodes) run in the same batches. Exactly one of the two.

    The output is a list: the samples' outputs, or the branches' outputs in order.
    """

    type: Literal["fork"]
    samples: int | None = Field(default=None, ge=1)
    branches: tuple[str, ...] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _samples_or_branches(self) -> ForkNode:
        if (self.samples is None) == (self.branches is None):
            raise ValueError("a fork takes exactly one of samples (with a prompt) or branches")
        if self.samples is not None and self.prompt is None:
            raise ValueError("a fork with samples needs a prompt")
        if self.branches is not None:
            fields = type(self).model_fields
            given = sorted(f for f in GENERATION_FIELDS if getattr(self, f) != fields[f].default)
            if given:
                raise ValueError(
                    f"a fork with branches runs other nodes and takes no generation fields "
                    f"(got {', '.join(given)})"
                )
        return self

    @property
    def generates(self) -> bool:
        """A fork of samples is one generation of its own; a fork of branches generates
        nothing itself (its branches are nodes of their own)."""
        return self.branches is None


class AssertNode(_NodeBase):
    """A Jinja2 expression over ``inputs`` and ``nodes`` that must be true, else the run fails."""

    type: Literal["assert"]
    that: str = Field(min_length=1)
    message: str | None = None

    @property
    def generates(self) -> Literal[False]:
        return False


class SubgraphNode(_NodeBase):
    """A call of a reusable ``/lib`` DAG by its path (``dag``), with its inputs.

    A string input is a template (a lone ``{{ expression }}`` keeps the value's type, so a
    list stays a list); any other JSON value is passed as is. The output is a mapping of the
    callee's signature outputs.

    ``route`` and ``complexity`` are the defaults of the callee's nodes that generate or
    call (``DagSpec.called_with``): a callee node's own setting wins.
    """

    type: Literal["subgraph"]
    dag: str = Field(pattern=LIB_PATTERN)
    inputs: dict[str, Any] = {}
    cache: bool = True
    route: Route = "auto"
    complexity: Complexity | None = None

    @property
    def generates(self) -> Literal[False]:
        """Its callee's nodes generate, in a run of their own."""
        return False


class ToolNode(_NodeBase):
    """A call of a registered tool (``pcrt tools list``) with ``arguments``: a string
    value is a template (a lone ``{{ expression }}`` keeps the value's type), any other
    JSON value is passed as is. The output is the tool's result: its JSON when it answers
    JSON, else its text. A tool that fails fails the node.

    The call is recorded before it is sent and its result before the run goes on, so a
    resume never sends it twice (see ``pcrt.runtime.dag.tool_calls``)."""

    type: Literal["tool"]
    tool: str = Field(pattern=TOOL_NAME_PATTERN)
    arguments: dict[str, Any] = {}
    timeout: float | None = Field(default=None, gt=0)  # default: the tool's own

    @property
    def generates(self) -> Literal[False]:
        return False


class AgentNode(_Generation):
    """A model with ``tools`` in a loop: it generates; the calls it makes run at once;
    their results join its conversation; it generates again, until it answers in text
    (the node's output) or has generated ``max_steps`` times (the node fails).

    ``tool_choice`` is the first step's (``auto``, ``required`` or a tool's name); after
    a call it is ``auto`` again, as OpenAI's Agents SDK resets it, or the model could
    never answer (``reset_tool_choice: false`` keeps it). The conversation's KV stays
    with the node between steps: each step computes only the results and the new turn's
    header. Each call is recorded before it
    is sent and its result before the model reads it: a resume never sends it again."""

    type: Literal["agent"]
    prompt: str = Field(min_length=1)
    tools: tuple[Annotated[str, Field(pattern=TOOL_NAME_PATTERN)], ...] = Field(min_length=1)
    tool_choice: str = "auto"
    # false: tool_choice holds for every step (the Agents SDK's reset_tool_choice); with
    # "required", the node calls until its max_tool_calls are spent, then answers
    reset_tool_choice: bool = True
    parallel_tool_calls: bool = True
    max_steps: int = Field(default=8, ge=1, le=64)
    # this node's calls, across its steps; once spent, it answers with tools withheld
    max_tool_calls: int | None = Field(default=None, ge=1)

    @property
    def generates(self) -> Literal[False]:
        """It generates, but as several generations with calls between: its own module
        runs it (``pcrt.runtime.dag.agent``), here."""
        return False


Node = Annotated[
    LlmNode | ForkNode | AssertNode | SubgraphNode | ToolNode | AgentNode,
    Field(discriminator="type"),
]


def tools_called(node: Node) -> tuple[str, ...]:
    """The tools a node calls itself: a tool node's one, an agent's; none for the rest
    (a subgraph call's callee is another document: see ``offsite.tools_needed``)."""
    if isinstance(node, ToolNode):
        return (node.tool,)
    return node.tools if isinstance(node, AgentNode) else ()


class DagSpec(BaseModel):
    """A whole DAG document, parsed. Build it with ``parse_dag`` or ``load_dag``."""

    model_config = _FROZEN

    dag: str = Field(pattern=PATH_PATTERN)
    description: str = ""
    inputs: dict[_Ident, InputSpec] = {}
    budget: Budget = Budget()
    signature: Signature | None = None
    nodes: dict[str, Node] = Field(min_length=1)
    # documents of /lib DAGs that come with this one; they take precedence over the library
    # directories. A run stores here every callee it can reach (``library.with_library``), so
    # a resume, or a peer it moves to, calls the same subgraphs. Parsed by ``library.py``.
    library: tuple[dict[str, Any], ...] = ()
    # set by parse_dag on a partial DAG only (see the module docstring)
    _rejected: dict[str, Any] = PrivateAttr(default_factory=dict)
    _shape_problems: tuple[Problem, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _fill_ids_and_paths(cls, data: Any) -> Any:
        """Give each node its id (its key) and default path; the caller's dict is not changed."""
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
            return data
        if len(data["nodes"]) > MAX_NODES:
            # checked before the nodes are: each costs the daemon's event loop its turn
            raise ValueError(
                f"a DAG has at most {MAX_NODES} nodes; this one has {len(data['nodes'])}"
            )
        dag = data.get("dag")
        base = dag if isinstance(dag, str) and dag.startswith("/") else "/dynamic"
        filled: dict[Any, Any] = {}
        for key, raw in data["nodes"].items():
            if isinstance(raw, dict):
                raw = {"id": key, "path": f"{base.rstrip('/')}/{key}", **raw}
            filled[key] = raw
        return {**data, "nodes": filled}

    def document(self) -> dict[str, Any]:
        """The document as plain JSON data that ``parse_dag`` reads back to an equal spec
        (unset fields left out: an input without a default stays required)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def called_with(self, route: Route = "auto", complexity: Complexity | None = None) -> DagSpec:
        """This DAG as a subgraph node with these routing hints calls it: every node that
        generates or calls (``llm``, a ``fork`` with samples, ``subgraph``) and leaves
        ``route`` at ``auto`` takes ``route``, and one that leaves ``complexity`` unset
        takes ``complexity``. A node's own setting wins: a callee node that says
        ``route: peer`` may leave the machine although its caller said ``route: local``.
        Hints on ``subgraph`` nodes pass the defaults on to their own callees, so they
        reach every depth. Without hints, the same spec (and the same document)."""
        if route == "auto" and complexity is None:
            return self
        document = self.document()
        for node_id, raw in document["nodes"].items():
            node = self.nodes[node_id]
            if not (node.generates or isinstance(node, SubgraphNode)):
                continue  # runs nothing anywhere: no hints to take
            if raw.get("route", "auto") == "auto" and route != "auto":
                raw["route"] = route
            if raw.get("complexity") is None and complexity is not None:
                raw["complexity"] = complexity
        return type(self).model_validate(document)

    @property
    def rejected(self) -> Mapping[str, Any]:
        """The raw documents of the nodes that failed their shape check, by id (a partial
        DAG's; empty otherwise)."""
        return self._rejected

    @property
    def shape_problems(self) -> tuple[Problem, ...]:
        """What was wrong with the ``rejected`` nodes."""
        return self._shape_problems

    @property
    def is_library(self) -> bool:
        return self.dag.startswith("/lib/")

    @property
    def input_specs(self) -> dict[str, InputSpec]:
        """Every input templates may read: the signature's, refined by ``inputs``."""
        merged = dict(self.signature.inputs) if self.signature else {}
        merged.update(self.inputs)
        return merged
