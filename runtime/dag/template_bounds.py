"""What a template can cost, proved from its AST before it renders in the daemon's process.

DAG templates render in the template worker (a child process with a memory limit and a
deadline), except *plain* ones, which render in the daemon: most prompts are plain
("Summarise {{ nodes.draft.output }}"), and a round trip to the worker waits for a core
while llama.cpp uses both (0.1 ms at the median, 3-4 ms at the 99th percentile on a
busy 2-core machine, against 15 us here). Plain used to mean "only cheap node types and
filters", which let ``(inputs.l | join(inputs.s)) | length > 0`` build 4 GB in the daemon
from a 260 KB request: a filter linear in each argument is quadratic in two.

Plain now means two things, both checked:

- ``cost_of`` (once per template): the AST proves that everything the template builds,
  and the time it takes, is at most ``constant + sum(factor * size(read))`` over the
  values it reads (``inputs.X``, ``nodes.ID.output...``), each factor fixed by the
  template's text. Whatever falls outside the proof makes a template not plain: loops,
  calls, ``*``, ``%``, ``**``, assignments, and filters that multiply their input by an
  argument (``replace``, ``indent``, ``center``, ``format``, ``wordwrap``, ``join`` with
  a separator that is not a literal, ``tojson`` with an indent, ...);
- ``Cost.fits`` (each render): the values it reads, measured with a cap on the work
  measuring takes, put that bound under ``PLAIN_BUDGET``. Else the worker renders it.

Sizes are characters of a value's text: ``len(v)`` for a string, ``len(repr(v))`` for
anything else, which is what ``str`` gives and what a container's text holds of each of
its items (so no item is bigger than its container). Costs count characters handled in C
as one unit and an item handled by Python code (a sort key, ``unique``'s loop, an AST
node evaluated) as ``PER_ITEM``: ``PLAIN_BUDGET`` units take about a millisecond here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import nodes

__all__ = ["MAX_MEASURED", "PLAIN_BUDGET", "PLAIN_SOURCE", "Cost", "Read", "cost_of"]

PLAIN_BUDGET = 1 << 18  # units one in-process render may cost: about a millisecond
PLAIN_SOURCE = 16_384  # longest template that may be plain: its first parse is ~20 ms
MAX_MEASURED = 512  # values walked to measure what a render reads: ~0.2 ms
PER_ITEM = 256  # an item handled by Python code, in units (a character in C is one)
ATTRIBUTE = 256  # text of an attribute of a JSON value: a method's repr, or int.real
NUMBER = 32  # text of a float (24 characters at most), or a number's growth by one op
BOOL = 5
REPR = 10  # repr(s) <= 10 * len(s) + 2: '\U000e0001' is ten characters for one


@dataclass(frozen=True)
class Read:
    """A value a template reads: a root (``inputs``, ``nodes``) and the constant
    attribute (``.x``) and item (``[0]``) steps after it."""

    root: str
    steps: tuple[tuple[str, str | int], ...] = ()


@dataclass(frozen=True)
class Cost:
    """An upper bound on a render's cost: ``constant + sum(factor * size(read))``."""

    reads: tuple[tuple[Read, float], ...]
    constant: float

    def fits(self, scope: Mapping[str, Any], budget: float = PLAIN_BUDGET) -> bool:
        """Whether rendering over ``scope`` costs at most ``budget``."""
        return self.measure(scope, budget) is not None

    def measure(self, scope: Mapping[str, Any], budget: float = PLAIN_BUDGET) -> float | None:
        """The bound over ``scope``; None past ``budget``: measuring stops at the first
        value that breaks it, or after ``MAX_MEASURED`` values."""
        left = budget - self.constant
        walk = _Walk()
        for read, factor in self.reads:
            if left < 0:
                return None
            size = _measure(read, scope, left / factor, walk)
            if size is None:
                return None
            left -= factor * size
        return None if left < 0 else budget - left


class _NotPlain(Exception):
    """Raised inside the analysis: the template is outside what it can bound."""


def cost_of(tree: nodes.Node, *, expression: bool) -> Cost | None:
    """The cost of rendering a template's AST (``expression``: of evaluating a bare
    expression and returning its value), or None when it cannot be bounded."""
    bound = _Bound()
    try:
        if expression:
            assert isinstance(tree, nodes.Expr)
            value = bound.value(tree)
            # the value comes back as JSON (12 characters for one at most), and a failed
            # assert shows each value it read
            bound.spend(value.scaled(12))
            bound.spend(_Linear({read: REPR for read in bound.reads}, 2 * len(bound.reads)))
        else:
            bound.statement(tree)
    except _NotPlain:
        return None
    total = bound.total
    return Cost(tuple(total.factors.items()), total.constant)


@dataclass
class _Linear:
    """``constant + sum(factor * size(read))``."""

    factors: dict[Read, float] = field(default_factory=dict)
    constant: float = 0.0

    def __add__(self, other: _Linear | float) -> _Linear:
        if not isinstance(other, _Linear):
            return _Linear(dict(self.factors), self.constant + other)
        factors = dict(self.factors)
        for read, factor in other.factors.items():
            factors[read] = factors.get(read, 0.0) + factor
        return _Linear(factors, self.constant + other.constant)

    def scaled(self, by: float) -> _Linear:
        return _Linear({r: f * by for r, f in self.factors.items()}, self.constant * by)


_ROOTS = frozenset({"inputs", "nodes"})


class _Bound:
    """Walks an AST: each expression's value bound, and the sum of them all in ``total``
    (every value is built, and each node is a step of Python code)."""

    def __init__(self) -> None:
        self.total = _Linear()
        self.reads: set[Read] = set()

    def spend(self, amount: _Linear | float) -> None:
        self.total = self.total + amount

    def statement(self, node: nodes.Node) -> None:
        if isinstance(node, nodes.Template):
            for child in node.body:
                self.statement(child)
        elif isinstance(node, nodes.Output):
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    self.spend(len(child.data))
                else:
                    self.spend(self.value(child))  # its text, in the output
        elif isinstance(node, nodes.If):
            self.value(node.test)
            for child in (*node.body, *node.elif_, *node.else_):
                self.statement(child)
        else:  # loops, macros, assignments ({% set a = a ~ a %} doubles per line), ...
            raise _NotPlain

    def value(self, node: nodes.Node) -> _Linear:
        bound = self._value(node)
        self.spend(bound + PER_ITEM)
        return bound

    def _value(self, node: nodes.Node) -> _Linear:
        read = _read_of(node)
        if read is not None:
            self.reads.add(read)
            return _Linear({read: 1.0})
        if isinstance(node, nodes.Const):
            return _Linear(constant=len(repr(node.value)))
        if isinstance(node, nodes.Getattr):  # an item of the value, or an attribute
            return self.value(node.node) + ATTRIBUTE
        if isinstance(node, nodes.Getitem):
            self.value(node.arg)
            return self.value(node.node) + ATTRIBUTE
        if isinstance(node, nodes.Slice):
            for part in (node.start, node.stop, node.step):
                if part is not None:
                    self.value(part)
            return _Linear(constant=NUMBER)
        if isinstance(node, nodes.Compare):
            self.value(node.expr)
            for operand in node.ops:
                self.value(operand.expr)
            return _Linear(constant=BOOL)
        if isinstance(node, nodes.Not):
            self.value(node.node)
            return _Linear(constant=BOOL)
        if isinstance(node, nodes.Neg | nodes.Pos):
            return self.value(node.node) + NUMBER
        if isinstance(node, nodes.And | nodes.Or):  # one of the two
            return self.value(node.left) + self.value(node.right)
        if isinstance(node, nodes.Add | nodes.Sub | nodes.Div | nodes.FloorDiv):
            # numbers grow by a digit (floats to 24 characters), strings and lists add up
            return self.value(node.left) + self.value(node.right) + NUMBER
        if isinstance(node, nodes.Concat):
            out = _Linear()
            for child in node.nodes:
                out += self.value(child)
            return out
        if isinstance(node, nodes.CondExpr):
            self.value(node.test)
            out = self.value(node.expr1)
            return out + self.value(node.expr2) if node.expr2 is not None else out
        if isinstance(node, nodes.List | nodes.Tuple):
            out = _Linear(constant=3)
            for item in node.items:
                out += self.value(item).scaled(REPR) + 4
            return out
        if isinstance(node, nodes.Dict):
            out = _Linear(constant=2)
            for pair in node.items:
                out += self.value(pair.key).scaled(REPR) + self.value(pair.value).scaled(REPR)
                out += 6
            return out
        if isinstance(node, nodes.Test):
            self._arguments(node)
            return _Linear(constant=BOOL)
        if isinstance(node, nodes.Filter):
            rule = _FILTERS.get(node.name)
            if rule is None or node.node is None:
                raise _NotPlain
            value, arguments = self._arguments(node)
            return rule(_Filtered(self, node, value, arguments))
        raise _NotPlain  # calls, '*', '%', '**', names other than inputs and nodes, ...

    def _arguments(self, node: nodes.Filter | nodes.Test) -> tuple[_Linear, _Linear]:
        """The bounds of the value filtered or tested, and of its arguments summed."""
        if node.dyn_args is not None or node.dyn_kwargs is not None or node.node is None:
            raise _NotPlain
        value = self.value(node.node)
        arguments = _Linear()
        for arg in (*node.args, *(kw.value for kw in node.kwargs)):
            arguments += self.value(arg)
        return value, arguments


def _read_of(node: nodes.Node) -> Read | None:
    """``nodes.a.output[0]`` -> Read("nodes", (("attr", "a"), ("attr", "output"),
    ("item", 0))); None unless every step is constant."""
    steps: list[tuple[str, str | int]] = []
    while True:
        if isinstance(node, nodes.Getattr):
            steps.append(("attr", node.attr))
            node = node.node
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str | int)
        ):
            steps.append(("item", node.arg.value))
            node = node.node
        elif isinstance(node, nodes.Name) and node.ctx == "load" and node.name in _ROOTS:
            return Read(node.name, tuple(reversed(steps)))
        else:
            return None


# -- filters ------------------------------------------------------------------------------
# Each rule gets the filter's node and the bounds of its value and arguments (already in
# the total), adds to the total what the filter spends besides, and returns the bound of
# its result. Text filters see str(value), which is no longer than the value's size.


@dataclass
class _Filtered:
    bound: _Bound
    node: nodes.Filter
    value: _Linear
    arguments: _Linear  # all of them, summed

    def argument(self, position: int, name: str) -> nodes.Expr | None:
        if len(self.node.args) > position:
            return self.node.args[position]
        return next((kw.value for kw in self.node.kwargs if kw.key == name), None)


_Rule = Callable[[_Filtered], _Linear]


def _same(f: _Filtered) -> _Linear:
    """No longer than its value and arguments: trim, string, safe, default, truncate."""
    return f.value + f.arguments + NUMBER


def _cased(f: _Filtered) -> _Linear:
    """upper, lower, capitalize: a case mapping triples a character at most ('ﬃ' 'FFI')."""
    return f.value.scaled(3) + f.arguments


def _title(f: _Filtered) -> _Linear:
    f.bound.spend(f.value.scaled(PER_ITEM))  # a Python step per word
    return f.value.scaled(3)


def _escape(f: _Filtered) -> _Linear:
    return f.value.scaled(5)  # '&' -> '&amp;'


def _count(f: _Filtered) -> _Linear:
    if f.node.name == "wordcount":
        f.bound.spend(f.value.scaled(PER_ITEM))  # a string object per word
    return _Linear(constant=NUMBER)


def _item(f: _Filtered) -> _Linear:
    """first, last, max, min: one item (max and min call a key per item)."""
    if f.node.name in ("max", "min"):
        f.bound.spend(f.value.scaled(PER_ITEM))
    return f.value + ATTRIBUTE


def _number(f: _Filtered) -> _Linear:
    """abs, float, int ('1e308' | int has 309 digits), round (a literal precision only:
    round(5, -10 ** 9) computes 10 ** 10 ** 9)."""
    if f.node.name == "round":
        for arg in (*f.node.args, *(kw.value for kw in f.node.kwargs)):
            if not isinstance(arg, nodes.Const):
                raise _NotPlain
            if isinstance(arg.value, int) and abs(arg.value) > 64:
                raise _NotPlain
    return f.value + f.arguments + 10 * NUMBER + 10


def _items(f: _Filtered) -> _Linear:
    """list, sort, unique, reverse, dictsort: the items as a list (a string's characters
    as "['a', 'b']", 14 characters for one at most), an object and a Python step each."""
    f.bound.spend(f.value.scaled(PER_ITEM))
    return f.value.scaled(REPR + 4) + ATTRIBUTE


def _join(f: _Filtered) -> _Linear:
    """The items' text plus a separator per item: linear only for a literal separator
    (``join(inputs.s)`` is the size of the list times the size of the separator). An
    item is at least a character of its container's text."""
    separator = f.argument(0, "d")
    if separator is None:
        width = 0
    elif isinstance(separator, nodes.Const) and isinstance(separator.value, str):
        width = len(separator.value)
    else:
        raise _NotPlain
    out = f.value.scaled(1 + width)
    if f.argument(1, "attribute") is not None:
        f.bound.spend(f.value.scaled(PER_ITEM))  # a getter per item, which may give a method
        out += f.value.scaled(ATTRIBUTE)
    return out


def _tojson(f: _Filtered) -> _Linear:
    """JSON of the value: '\\ud83d\\ude00' is 12 characters for one; an ``indent``
    repeats per item and level, so it is not plain."""
    if f.node.args or f.node.kwargs:
        raise _NotPlain
    return f.value.scaled(12) + 2


_FILTERS: dict[str, _Rule] = {
    "abs": _number,
    "capitalize": _cased,
    "count": _count,
    "d": _same,
    "default": _same,
    "dictsort": _items,
    "e": _escape,
    "escape": _escape,
    "first": _item,
    "float": _number,
    "int": _number,
    "join": _join,
    "last": _item,
    "length": _count,
    "list": _items,
    "lower": _cased,
    "max": _item,
    "min": _item,
    "reverse": _items,
    "round": _number,
    "safe": _same,
    "sort": _items,
    "string": _same,
    "title": _title,
    "tojson": _tojson,
    "trim": _same,
    "truncate": _same,
    "unique": _items,
    "upper": _cased,
    "wordcount": _count,
}


# -- measuring what a render reads --------------------------------------------------------


class _Walk:
    """Values measured so far in one render's check."""

    def __init__(self) -> None:
        self.left = MAX_MEASURED

    def step(self) -> bool:
        self.left -= 1
        return self.left >= 0


def _measure(read: Read, scope: Mapping[str, Any], limit: float, walk: _Walk) -> float | None:
    """The size of what ``read`` reads, as the sandbox resolves it (``.x`` prefers an
    attribute, ``[x]`` an item); None when over ``limit``, too many values to walk, or
    not JSON data."""
    if read.root not in scope:
        return 0.0  # undefined: the render fails
    value: Any = scope[read.root]
    for kind, key in read.steps:
        found, item = _step(value, kind, key)
        if found is None:
            return 0.0  # undefined
        if not found:  # an attribute: a method, or a number's part; no bigger below
            size = _size(value, limit, walk, top=True)
            return None if size is None else size + ATTRIBUTE
        value = item
    return _size(value, limit, walk, top=True)


def _step(value: Any, kind: str, key: str | int) -> tuple[bool | None, Any]:
    """(True, item) for an item, (False, None) for an attribute, (None, None) when the
    sandbox finds neither."""
    attribute = isinstance(key, str) and hasattr(value, key)
    if kind == "attr" and attribute:
        return False, None
    if isinstance(value, dict) and key in value:
        return True, value[key]
    if (
        isinstance(value, list | tuple | str)
        and isinstance(key, int)
        and -len(value) <= key < len(value)
    ):
        return True, value[key]
    return (False, None) if attribute else (None, None)


def _size(value: Any, limit: float, walk: _Walk, *, top: bool) -> float | None:
    """``len(value)`` for a string at the top, else a bound on ``len(repr(value))``;
    None past ``limit`` or ``MAX_MEASURED`` values, or for anything but JSON data."""
    if not walk.step():
        return None
    size: float
    if isinstance(value, str):
        size = len(value) if top else _repr_size(value)
    elif value is None or isinstance(value, bool):
        size = BOOL
    elif isinstance(value, int):
        size = value.bit_length() * 0.302 + 2  # its digits and a sign
    elif isinstance(value, float):
        size = 24
    elif isinstance(value, list | tuple):
        size = 3
        for item in value:
            inner = _size(item, limit - size, walk, top=False)
            if inner is None:
                return None
            size += inner + 2
            if size > limit:
                return None
    elif isinstance(value, dict):
        size = 2
        for key, item in value.items():
            left = _size(key, limit - size, walk, top=False)
            right = None if left is None else _size(item, limit - size - left, walk, top=False)
            if left is None or right is None:
                return None
            size += left + right + 4
            if size > limit:
                return None
    else:
        return None
    return size if size <= limit else None


def _repr_size(text: str) -> float:
    if text.isascii() and text.isprintable():  # only backslashes and quotes escaped
        return len(text) + 2 + text.count("\\") + text.count("'")
    return REPR * len(text) + 2
