"""What a request's output must match, as llguidance's grammar text: pure checks.

A request constrains its output with a JSON schema (``response_format``, a DAG node's
``output_schema``) or a raw grammar (GBNF as llama.cpp reads it, or llguidance's Lark).
``constraint_of`` turns either into a ``Constraint``: the grammar llguidance compiles
(``grammar_compiler``), its key for the compile cache, and where it came from. Everything
here is cheap and needs no model, so the HTTP layer, the DAG validator and the fake engine
refuse what would fail before any slot is taken.

Bounds come first, because llguidance has no compile timeout and its compiler recurses:
some 3,000 chained rules or ``$ref`` s overflow an 8 MB stack and kill the process
(compiles run on a thread with a 64 MB stack, and these bounds stay far below what that
takes); its GBNF converter is pure Python and quadratic in the rules (4,000: 3.8 s).

Objects are closed: a schema object with ``properties`` and no ``additionalProperties``
gets ``additionalProperties: false``, as llama.cpp's converter did and OpenAI's strict
mode requires. It only narrows what validates (the output still validates against the
schema as given), and a small model left an open object invents keys until max_tokens.
``additionalProperties: true`` opens one again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

from pcrt.runtime.errors import ConstraintInvalid

if TYPE_CHECKING:  # a TypedDict of llguidance's stubs only, not of the module
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "MAX_GRAMMAR_BYTES",
    "MAX_GRAMMAR_DEPTH",
    "MAX_GRAMMAR_RULES",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_REFS",
    "Constraint",
    "constraint_of",
    "grammar_shape",
    "locate_problem",
]

# Bounds (see the docstring): each far below what crashes or stalls, each far above what
# people write. OpenAI's own limits for comparison: 5,000 properties, 10 levels deep.
MAX_SCHEMA_BYTES = 256 * 1024  # the schema's compact JSON; 10k properties compile in 0.9 s
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays in the schema's JSON
MAX_SCHEMA_REFS = 1000  # "$ref"s: chained ones recurse in the compiler
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_DEPTH = 250  # nested ( ) groups: the GBNF converter recurses (500 fail)
MAX_GRAMMAR_RULES = 1000  # GBNF "::=" or Lark "name:" rules

# llguidance's JSON options, every one pinned: strict JSON, nothing dropped or coerced.
# Between tokens: nothing, one space, or a newline and up to 20 columns of indent, as
# llama.cpp's converter allows; llguidance's default (unbounded) lets a small model pad
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "whitespace_pattern": r"[ ]?|\n[ \t]{0,20}",
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
    "coerce_one_of": False,
}

_LARK_RULE = re.compile(r"^\s*[?!]?[A-Za-z_][A-Za-z0-9_.]*(\s*\{[^}]*\})?\s*:", re.MULTILINE)


@dataclass(frozen=True)
class Constraint:
    """A compiled-to-be grammar: llguidance's grammar text and the key it is cached by."""

    source: Literal["json_schema", "grammar"]
    grammar: str  # llguidance's top-level grammar (JSON), what ``LLMatcher`` compiles
    key: str  # sha256 of ``grammar``
    schema: dict[str, Any] | None = None  # the schema as given (json_schema only)

    def explain(self, error: str) -> ConstraintInvalid:
        """llguidance's compile error as a 400 that says where in the schema it is."""
        if self.schema is None:
            return ConstraintInvalid("grammar", "", _one_line(error))
        return locate_problem(self.schema, error)


def constraint_of(json_schema: dict[str, Any] | None, grammar: str | None) -> Constraint | None:
    """The constraint a request asks for, checked against the bounds (``ConstraintInvalid``
    otherwise), or None. Not compiled: see ``grammar_compiler``."""
    if json_schema is not None:
        return _from_schema(json_schema)
    if grammar is not None:
        return _from_grammar(grammar)
    return None


def _from_schema(schema: dict[str, Any]) -> Constraint:
    if not isinstance(schema, dict):
        raise ConstraintInvalid("json_schema", "", "a schema must be a JSON object")
    text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ConstraintInvalid(
            "json_schema", "", f"{len(text)} bytes of JSON; at most {MAX_SCHEMA_BYTES}"
        )
    depth, refs = _json_shape(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise ConstraintInvalid(
            "json_schema", "", f"nests {depth} objects or arrays deep; at most {MAX_SCHEMA_DEPTH}"
        )
    if refs > MAX_SCHEMA_REFS:
        raise ConstraintInvalid("json_schema", "", f"{refs} $refs; at most {MAX_SCHEMA_REFS}")
    if "x-guidance" in schema:  # its "lenient" would drop keywords, its separators JSON
        raise ConstraintInvalid(
            "json_schema", "x-guidance", "llguidance's options are pcrt's to set; remove it"
        )
    grammar = LLMatcher.grammar_from_json_schema(close_objects(schema), overrides=JSON_OPTIONS)
    return Constraint("json_schema", grammar, _sha(grammar), schema)


def _from_grammar(text: str) -> Constraint:
    if len(text) > MAX_GRAMMAR_BYTES:
        raise ConstraintInvalid(
            "grammar", "", f"{len(text)} characters; at most {MAX_GRAMMAR_BYTES}"
        )
    # GBNF's shape is read character by character; Lark's /regexes/ would mislead that
    # reading, and llguidance parses Lark itself (its own nesting limit, <[id]> tokens)
    lark = is_lark_syntax(text)
    depth, rules, literals = (0, 0, []) if lark else grammar_shape(text)
    rules = max(rules, len(_LARK_RULE.findall(text)))
    if depth > MAX_GRAMMAR_DEPTH:
        raise ConstraintInvalid(
            "grammar", "", f"it nests groups {depth} deep; at most {MAX_GRAMMAR_DEPTH}"
        )
    if rules > MAX_GRAMMAR_RULES:
        raise ConstraintInvalid("grammar", "", f"it has {rules} rules; at most {MAX_GRAMMAR_RULES}")
    if literals:
        raise ConstraintInvalid(
            "grammar",
            "",
            f"token literals such as {literals[0]} are not supported; "
            "write the token's text as a string instead",
        )
    try:
        lark_text = text if lark else gbnf_to_lark(text)
    except RecursionError:
        raise ConstraintInvalid("grammar", "", "it nests too deeply to convert") from None
    except Exception as exc:  # the converter raises bare ValueErrors and worse on bad GBNF
        raise ConstraintInvalid("grammar", "", f"it does not parse: {exc}") from None
    grammar = LLMatcher.grammar_from_lark(lark_text)
    return Constraint("grammar", grammar, _sha(grammar))


def grammar_shape(gbnf: str) -> tuple[int, int, list[str]]:
    """How deeply a GBNF text nests ``( )`` groups, how many rules (``::=``) it has, and
    its token literals (``<|im_end|>``, ``<[42]>``), outside strings, classes, comments."""
    depth = deepest = rules = 0
    literals: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in '"[<':  # a string, a character class, a token literal
            close = {'"': '"', "[": "]", "<": ">"}[c]
            start = i
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
            if c == "<" and len(literals) < 1:
                literals.append(gbnf[start : i + 1][:40])
        elif c == "#":
            while i < n and gbnf[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)  # a stray ")" must not hide the nesting after it
        elif gbnf.startswith("::=", i):
            rules += 1
        i += 1
    return deepest, rules, literals


# -- JSON schemas ------------------------------------------------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONES = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
)


def subschemas(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object inside ``schema`` (itself first) with its dotted path; a
    property named like a keyword is a name, never taken for the keyword."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SCHEMA_MAPS:
        children = schema.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from subschemas(child, _join(path, key, str(name)))
    for key in _SCHEMA_LISTS:
        children = schema.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from subschemas(child, _join(path, key, str(i)))
    for key in _SCHEMA_ONES:
        child = schema.get(key)
        if isinstance(child, list):  # draft-07 tuple "items"
            for i, item in enumerate(child):
                yield from subschemas(item, _join(path, key, str(i)))
        else:
            yield from subschemas(child, _join(path, key))


def close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy with ``additionalProperties: false`` on each object schema that lists its
    ``properties`` alone and says nothing of other keys.

    Only where closing cannot take away a value the schema itself allows: never an
    object combined with ``allOf``/``anyOf``/``oneOf``/``$ref`` (their parts' properties
    merge into it), nor a part of such a combination or the target of a ``$ref`` under
    ``allOf``, nor an object whose ``required`` names a key its ``properties`` do not."""
    closed = copy.deepcopy(schema)
    merged: set[int] = set()  # schemas whose properties merge with others'
    all_of_refs: set[str] = set()
    for _, s in subschemas(closed):
        for key in _COMBINERS:
            for part in s.get(key) or []:
                if key != "allOf" and "properties" not in s:
                    continue  # an anyOf of whole objects: each may be closed
                if isinstance(part, dict):
                    merged.add(id(part))
                    if isinstance(part.get("$ref"), str):
                        all_of_refs.add(part["$ref"])
    for where, s in subschemas(closed):
        properties = s.get("properties")
        if (
            isinstance(properties, dict)
            and id(s) not in merged
            and not any(k in s for k in (*_COMBINERS, "$ref", *_OPENERS))
            and set(s.get("required") or ()) <= set(properties)
            and f"#/{where.replace('.', '/')}" not in all_of_refs
        ):
            s["additionalProperties"] = False
    return closed


_COMBINERS = ("allOf", "anyOf", "oneOf")
_OPENERS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def locate_problem(schema: dict[str, Any], error: str) -> ConstraintInvalid:
    """llguidance's error for ``schema`` (it names no place) with the place found."""
    line = _one_line(error)
    keys = re.match(r"Unimplemented keys: \[(.*)\]", line)
    if keys:
        names = re.findall(r'"([^"]+)"', keys.group(1))
        for where, s in subschemas(schema):
            for name in names:
                if name in s:
                    return ConstraintInvalid(
                        "json_schema",
                        _join(where, name),
                        f"the keyword {name!r} is not supported by constrained decoding",
                    )
    fmt = re.match(r"Unknown format: (.+)", line)
    if fmt:
        for where, s in subschemas(schema):
            if s.get("format") == fmt.group(1).strip():
                return ConstraintInvalid(
                    "json_schema",
                    _join(where, "format"),
                    f"the format {fmt.group(1).strip()!r} is not supported; supported: "
                    "date-time, time, date, duration, email, hostname, ipv4, ipv6, uuid, uri",
                )
    quoted = {part.strip() for part in error.splitlines()}  # a regex error quotes the regex
    pointer = re.search(r"Pointer '([^']*)'|Resource '([^']*)'", line)
    unsatisfiable = re.search(r"required property '([^']*)' is unsatisfiable", line)
    for where, s in subschemas(schema):
        if "regex parse error" in line and str(s.get("pattern")) in quoted:
            return ConstraintInvalid("json_schema", _join(where, "pattern"), line)
        if "oneOf constraints" in line and "oneOf" in s:
            return ConstraintInvalid("json_schema", _join(where, "oneOf"), line)
        if "min/maxProperties" in line and ("minProperties" in s or "maxProperties" in s):
            keyword = "minProperties" if "minProperties" in s else "maxProperties"
            return ConstraintInvalid("json_schema", _join(where, keyword), line)
        ref = s.get("$ref")
        if pointer and isinstance(ref, str) and ref in (f"#{pointer.group(1)}", pointer.group(2)):
            return ConstraintInvalid("json_schema", _join(where, "$ref"), line)
        if unsatisfiable and unsatisfiable.group(1) in (s.get("required") or ()):
            field = _join(where, "properties", unsatisfiable.group(1))
            return ConstraintInvalid("json_schema", field, line)
    return ConstraintInvalid("json_schema", "", line)


def _json_shape(value: Any) -> tuple[int, int]:
    """(deepest nesting of objects and arrays, number of "$ref" keys), without recursion."""
    deepest = refs = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            refs += "$ref" in item
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest, refs


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _one_line(error: str) -> str:
    """llguidance's message on one line (a regex error spreads over three), not too long."""
    text = " ".join(line.strip() for line in error.strip().splitlines())
    return text[:500] if text else "it does not compile"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
