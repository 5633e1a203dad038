"""Jinja2 for DAGs: a sandbox to render prompts and evaluate asserts, and a reference scanner.

DAG documents may come from an agent over HTTP, so templates are untrusted: they run in an
immutable sandbox (no ``__class__`` walks, no mutation of outputs, bounded ``*`` and
``**``), with ``StrictUndefined`` so a missing value is an error and never an empty string
in a prompt. Expressions go through ``compile_expression``, never ``eval``.

Templates see two names: ``inputs`` (the run's inputs) and ``nodes`` (``nodes.ID.output``
for each finished node). The scanner reads a template's AST for ``inputs.X`` and
``nodes.ID.output...`` chains, which is how validation finds unknown references and how
dependencies are implied without ``needs``.

This module owns the sandbox and the scanner; where a template runs (here, or in the
template worker) and the calls that run it are ``template_render``'s.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.meta import TrackingCodeGenerator
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pcrt.runtime.dag.template_bounds import PLAIN_BUDGET, PLAIN_SOURCE, Cost, cost_of
from pcrt.runtime.dag.template_worker import TemplateWorker

__all__ = [
    "DagSandbox",
    "Prepared",
    "Reference",
    "TemplateInfo",
    "make_environment",
    "make_scope",
    "metering",
    "parse_expression",
    "sandbox_here",
    "scan_expression",
    "scan_template",
]

ROOTS: frozenset[str] = frozenset({"inputs", "nodes"})
MAX_SEQUENCE = 100_000  # longest string or list a template may build with '*'
MAX_EXPONENT = 1_024
MAX_INT_BITS = 1_000_000  # '**' results: ((2**1024)**1024)**64 would be 8 GB
MAX_STEPS = 1_000_000  # loop iterations in one render or evaluation
MAX_SECONDS = 1.0  # and the wall time it may take, however it spends it
_NESTED_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\{")
# widths that pad text: 'x'|center(10**8) or '%0100000000d' % 1 build 100 MB
_WIDTH_FILTERS = {"center": "width", "indent": "width", "wordwrap": "width", "truncate": "length"}
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_FORMAT_WIDTH = re.compile(r"[%:][-#0 +<>=^,_]*(\d+)?(?:\.(\d+))?")
_METER: ContextVar[_Meter | None] = ContextVar("pcrt_template_meter", default=None)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CACHED = 256  # templates kept compiled, with at most
_CACHED_SOURCE = 512 * 1024  # characters of source in all (a compiled one is ~16x that)


class _NoFolding(CodeGenerator):
    """Jinja's compiler, except that it never runs template code.

    Jinja folds constant output at compile time: ``{{ 'a\\n...' | indent(99999) }}``
    called ``indent`` when the template was only compiled, and DAG validation compiles
    every template in the daemon's process (a 6 KB template built 300 MB there). Here
    such output is computed when the template renders, in the worker, bounded."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        raise nodes.Impossible()


class _NamesRead(TrackingCodeGenerator):
    """``jinja2.meta.find_undeclared_variables``'s walk, without folding constants (see
    ``_NoFolding``) and without the optimiser, which folds too (and takes time quadratic
    in the depth of an expression: 57 ms for 40 ``and``-ed clauses)."""

    def __init__(self, environment: DagSandbox) -> None:
        super().__init__(environment)
        self.optimizer = None

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        raise nodes.Impossible()


@dataclass(frozen=True)
class Prepared:
    """A template (or expression) parsed once: its cost when it is plain, and, when it
    runs in this process, its compiled form (or the error compiling it gave)."""

    cost: Cost | None  # None: not plain, the template worker runs it
    program: Callable[[Mapping[str, Any]], Any] | None = None
    error: str | None = None  # why it does not compile, as a render failure says it


class DagSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, bounded in what one template may cost: repetition, powers,
    padding widths and loop iterations (``'a' * 10**9``, ``'x'|center(10**8)`` and nested
    ``range`` loops are refused), with messages that say which. What holds a template to
    its time and memory whatever it does is the worker process it runs in (see
    ``template_worker``); plain templates, whose cost ``template_bounds`` proves small
    for the values they read, run in the daemon's process."""

    intercepted_binops = frozenset({"*", "**", "%"})
    code_generator_class = _NoFolding
    worker: TemplateWorker | None = None  # None: templates run in this process

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # touched by the event loop and by the threads that prepare templates off it
        self._prepared: OrderedDict[tuple[str, bool], Prepared] = OrderedDict()
        self._prepared_source = 0
        self._prepared_lock = threading.Lock()
        for name, width_name in _WIDTH_FILTERS.items():
            self.filters[name] = _bounded_filter(self.filters[name], name, width_name)
        self.filters["format"] = _bounded_format(self.filters["format"])

    def prepared(self, source: str, expression: bool = False) -> Prepared | None:
        """What ``prepare`` gave for this template, if it is still cached."""
        key = (source, expression)
        with self._prepared_lock:
            found = self._prepared.get(key)
            if found is not None:
                self._prepared.move_to_end(key)
            return found

    def prepare(self, source: str, expression: bool = False) -> Prepared:
        """Parse, bound and compile a template once (cached, most recently used first).

        With a worker, only plain templates are compiled: the rest never run here. It
        takes milliseconds for a long template: the event loop calls it in a thread."""
        found = self.prepared(source, expression)
        if found is not None:
            return found
        prepared = self._prepare(source, expression)
        if len(source) <= PLAIN_SOURCE:
            with self._prepared_lock:
                key = (source, expression)
                if key not in self._prepared:
                    self._prepared[key] = prepared
                    self._prepared_source += len(source)
                while len(self._prepared) > _CACHED or self._prepared_source > _CACHED_SOURCE:
                    (old, _), _ = self._prepared.popitem(last=False)
                    self._prepared_source -= len(old)
        return prepared

    def _prepare(self, source: str, expression: bool) -> Prepared:
        cost: Cost | None = None
        if self.worker is not None:
            if len(source) > PLAIN_SOURCE:
                return Prepared(cost=None)
            try:
                tree: nodes.Node = (
                    parse_expression(self, source) if expression else self.parse(source)
                )
            except Exception:
                return Prepared(cost=None)  # the worker gives its error
            cost = cost_of(tree, expression=expression)
            if cost is None or cost.constant > PLAIN_BUDGET:
                return Prepared(cost=None)  # never fits: not worth compiling
        try:
            if expression:
                run = self.compile_expression(source, undefined_to_none=False)
                return Prepared(cost, lambda scope: run(**scope))
            return Prepared(cost, self.from_string(source).render)
        except Exception as exc:  # a syntax error, or an unknown filter or test
            return Prepared(cost, error=f"{type(exc).__name__}: {exc}")

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every ``for`` loop iterates through the meter (see ``_metered``)."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            # imported by its module path: a name, a template could assign over
            loop.iter = nodes.Call(
                nodes.ImportedName(f"{__name__}._metered", lineno=loop.lineno),
                [loop.iter],
                [],
                None,
                None,
                lineno=loop.lineno,
            )
        return tree

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") in _WIDTH_METHODS:
            _check_widths((*args, *kwargs.values()), f"str.{__obj.__name__}")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``'{:>9}'.format(x)``: the sandbox's own wrapper, after the widths are checked."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text: str = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(text, "str.format")
            if _NESTED_WIDTH.search(text):  # '{0:>{1}}': an argument is a width
                _check_widths((*args, *kwargs.values()), "str.format")
            return wrapped(*args, **kwargs)

        return checked

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_SEQUENCE
                ):
                    raise SecurityError(f"'*' would build more than {MAX_SEQUENCE} items")
        if (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and abs(right) > MAX_EXPONENT
        ):
            raise SecurityError(f"'**' with an exponent above {MAX_EXPONENT}")
        if (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and left.bit_length() * abs(right) > MAX_INT_BITS
        ):
            raise SecurityError(f"'**' would build an integer over {MAX_INT_BITS} bits")
        if operator == "%" and isinstance(left, str):
            _check_percent(left, right, "'%'")
        return super().call_binop(context, operator, left, right)


class _Meter:
    """What one render has spent so far."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise SecurityError(f"the template loops more than {MAX_STEPS} times")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise SecurityError(f"the template took over {MAX_SECONDS:g} s to render")


def _metered(iterable: Any) -> Iterator[Any]:
    meter = _METER.get()
    for item in iterable:
        if meter is not None:
            meter.step()
        yield item


@contextmanager
def metering() -> Iterator[None]:
    """The meter for one render or evaluation (loop steps and wall time)."""
    token = _METER.set(_Meter())
    try:
        yield
    finally:
        _METER.reset(token)


def _check_widths(values: tuple[Any, ...], what: str) -> None:
    for value in values:
        if isinstance(value, int) and value > MAX_SEQUENCE:
            raise SecurityError(f"{what} with a width over {MAX_SEQUENCE}")


def _check_percent(text: str, values: Any, what: str) -> None:
    """``text % values``: its literal widths, and the values a ``*`` takes as widths."""
    _check_format(text, what)
    if "*" in text:
        _check_widths(values if isinstance(values, tuple) else (values,), what)


def _check_format(text: str, what: str) -> None:
    for match in _FORMAT_WIDTH.finditer(text):
        for number in match.groups():
            if number is not None and int(number) > MAX_SEQUENCE:
                raise SecurityError(f"{what} with a width over {MAX_SEQUENCE}")


def _bounded_filter(filter_: Callable[..., Any], name: str, width_name: str) -> Callable[..., Any]:
    """``filter_``, refusing a width over ``MAX_SEQUENCE`` (its first argument after the
    value, or ``width_name``). The wrapper keeps Jinja's marker (``pass_environment``,
    ``pass_eval_context``, ``pass_context``): without it ``truncate`` and ``wordwrap``
    were called without their environment, and always failed."""
    passed = 1 if hasattr(filter_, "jinja_pass_arg") else 0  # the environment or context

    @functools.wraps(filter_)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        after = args[passed + 1 :]  # the arguments after the value
        width = after[0] if after else kwargs.get(width_name)
        if isinstance(width, str):  # indent's own indentation
            width = len(width)
        if isinstance(width, int) and width > MAX_SEQUENCE:
            raise SecurityError(f"'{name}' with a width over {MAX_SEQUENCE}")
        return filter_(*args, **kwargs)

    return bounded


def _bounded_format(filter_: Callable[..., Any]) -> Callable[..., Any]:
    passed = 1 if hasattr(filter_, "jinja_pass_arg") else 0

    @functools.wraps(filter_)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        value = args[passed] if len(args) > passed else None
        if isinstance(value, str):
            _check_percent(value, args[passed + 1 :], "'format'")
        return filter_(*args, **kwargs)

    return bounded


def make_environment() -> DagSandbox:
    """A fresh sandbox: strict undefined, no autoescape, prompts kept byte for byte.

    It parses and checks templates here; it runs them in a child process of its own (see
    ``template_worker``), started on the first render and stopped with the sandbox."""
    env = sandbox_here()
    worker = TemplateWorker()
    env.worker = worker
    weakref.finalize(env, worker.close)
    return env


def sandbox_here() -> DagSandbox:
    """A sandbox that runs templates in this process: the template worker's own.
    Not optimised: the optimiser folds constant expressions, i.e. runs template code,
    while a template is only being compiled to check it."""
    return DagSandbox(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        optimized=False,
    )


@dataclass(frozen=True)
class Reference:
    """A read of ``inputs`` or ``nodes`` with the constant attribute/index chain after it.

    An empty ``path`` means the root itself was read (``{{ inputs }}``, ``nodes[name]``).
    """

    root: Literal["inputs", "nodes"]
    path: tuple[str | int, ...]

    @property
    def text(self) -> str:
        out: str = self.root
        for part in self.path:
            out += f".{part}" if isinstance(part, str) and _IDENT.match(part) else f"[{part!r}]"
        return out

    @property
    def name(self) -> str | None:
        """The input name or node id read, if constant."""
        head = self.path[0] if self.path else None
        return head if isinstance(head, str) else None


@dataclass(frozen=True)
class TemplateInfo:
    """What a template reads: its references (in order, deduplicated) and any other names."""

    references: tuple[Reference, ...]
    other_names: frozenset[str]

    def node_ids(self) -> set[str]:
        return {r.name for r in self.references if r.root == "nodes" and r.name is not None}


def scan_template(env: DagSandbox, source: str) -> TemplateInfo:
    """Parse and compile a template; raises ``TemplateSyntaxError`` (unknown filters too)."""
    ast = env.parse(source)
    env.compile(ast)  # unknown filters and tests are compile errors, not parse errors
    return _info(env, ast)


def scan_expression(env: DagSandbox, source: str) -> TemplateInfo:
    """Like ``scan_template`` for a bare expression (``assert.that``, signature values)."""
    ast = nodes.Template([nodes.Output([parse_expression(env, source)])], lineno=1)
    ast.set_environment(env)
    env.compile_expression(source)
    return _info(env, ast)


def parse_expression(env: DagSandbox, source: str) -> nodes.Expr:
    parser = Parser(env, source, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        token = parser.stream.current
        raise TemplateSyntaxError(
            f"unexpected {token.value!r} after the expression", token.lineno, None, None
        )
    return expr


def _info(env: DagSandbox, ast: nodes.Template) -> TemplateInfo:
    refs = list(dict.fromkeys(_walk(ast)))
    names = _NamesRead(env)
    names.visit(ast)
    others = names.undeclared_identifiers - ROOTS - set(env.globals)
    return TemplateInfo(references=tuple(refs), other_names=frozenset(others))


def _walk(node: nodes.Node) -> Iterator[Reference]:
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        chain = _chain(node)
        if chain is not None and chain[0] in ROOTS:
            yield Reference(chain[0], chain[1])  # type: ignore[arg-type]
            return
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in ROOTS:
        yield Reference(node.name, ())  # type: ignore[arg-type]
        return
    for child in node.iter_child_nodes():
        yield from _walk(child)


def _chain(node: nodes.Node) -> tuple[str, tuple[str | int, ...]] | None:
    """``nodes.a.output[0]`` -> ("nodes", ("a", "output", 0)); None if a key is not constant."""
    parts: list[str | int] = []
    while True:
        if isinstance(node, nodes.Getattr):
            parts.append(node.attr)
            node = node.node
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str | int)
            and not isinstance(node.arg.value, bool)
        ):
            parts.append(node.arg.value)
            node = node.node
        elif isinstance(node, nodes.Name):
            return node.name, tuple(reversed(parts))
        else:
            return None


def make_scope(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The names templates see: ``inputs`` and ``nodes.ID.output`` for finished nodes."""
    return {"inputs": dict(inputs), "nodes": {k: {"output": v} for k, v in outputs.items()}}
