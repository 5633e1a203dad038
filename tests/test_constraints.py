"""What constrained decoding refuses, and how it says so (no model: the fast tier).

A schema or grammar the engine cannot honour is a ``ConstraintInvalid`` that names the
place (``properties.tags.uniqueItems``), never a looser grammar; one that would overflow
llguidance's recursive compiler or stall on its quadratic GBNF converter is refused by
its shape before it is compiled; one that passes compiles on a 64 MB stack.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time

import pytest
from llguidance import LLMatcher, LLTokenizer

from bench.stall import many_rules_grammar
from pcrt.runtime.engine.constraints import (
    MAX_GRAMMAR_RULES,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_REFS,
    close_objects,
    constraint_of,
)
from pcrt.runtime.engine.grammar_compiler import GrammarCompiler, check_compiles, on_big_stack
from pcrt.runtime.errors import ConstraintInvalid


def _refused(schema: object = None, grammar: str | None = None) -> ConstraintInvalid:
    with pytest.raises(ConstraintInvalid) as caught:
        constraint = constraint_of(schema, grammar)
        assert constraint is not None
        check_compiles(constraint)
    return caught.value


def _object(**properties: object) -> dict[str, object]:
    return {"type": "object", "properties": properties}


@pytest.mark.parametrize(
    ("schema", "where", "says"),
    [
        (
            _object(tags={"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
            "properties.tags.uniqueItems",
            "'uniqueItems' is not supported",
        ),
        (
            _object(a=_object(b={"type": "array", "contains": {"type": "integer"}})),
            "properties.a.properties.b.contains",
            "'contains' is not supported",
        ),
        (
            {"$defs": {"n": {"not": {"type": "null"}}}, "$ref": "#/$defs/n"},
            "$defs.n.not",
            "'not' is not supported",
        ),
        (
            _object(link={"type": "string", "format": "uri-reference"}),
            "properties.link.format",
            "'uri-reference' is not supported",
        ),
        (
            _object(code={"type": "string", "pattern": "(?=a)b"}),
            "properties.code.pattern",
            "look-around",
        ),
        (
            _object(x={"oneOf": [{"type": "integer"}, {"type": "number"}]}),
            "properties.x.oneOf",
            "oneOf",
        ),
        ({"$ref": "#/$defs/missing"}, "$ref", "does not exist"),
        (
            _object(n={"type": "integer", "minimum": 5, "maximum": 1}) | {"required": ["n"]},
            "properties.n",
            "required property 'n' is unsatisfiable",
        ),
        ({"type": "nonsense"}, "", "Invalid type"),
    ],
)
def test_what_cannot_be_constrained_is_named_where_it_is(
    schema: dict[str, object], where: str, says: str
) -> None:
    error = _refused(schema)
    assert error.source == "json_schema"
    assert error.where == where, str(error)
    assert says in str(error)


def test_a_property_named_like_a_keyword_is_a_name() -> None:
    schema = _object(uniqueItems={"type": "string", "format": "uri-reference"})
    assert _refused(schema).where == "properties.uniqueItems.format"


def test_the_features_people_use_compile() -> None:
    from tests.schema_corpus import CORPUS

    for case in CORPUS:
        constraint = constraint_of(case.schema, None)
        assert constraint is not None
        check_compiles(constraint)


def _nested_arrays(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _ref_chain(length: int) -> dict[str, object]:
    defs: dict[str, object] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(length)}
    defs[f"d{length}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "description": "a" * 300_000}, "bytes of JSON; at most 262144"),
        (_nested_arrays(MAX_SCHEMA_DEPTH + 10), f"deep; at most {MAX_SCHEMA_DEPTH}"),
        (_ref_chain(3000), f"3001 $refs; at most {MAX_SCHEMA_REFS}"),
    ],
)
def test_schemas_past_the_bounds_are_refused_before_compiling(
    schema: dict[str, object], says: str
) -> None:
    with pytest.raises(ConstraintInvalid) as caught:
        constraint_of(schema, None)
    assert says in str(caught.value)


def test_a_long_ref_chain_under_the_bound_compiles_without_crashing() -> None:
    """900 chained $refs: on a thread's default 8 MB stack, some 2,500 kill the process;
    the compile runs on 64 MB and the bound (1,000) keeps far from that too."""
    constraint = constraint_of(_ref_chain(900), None)
    assert constraint is not None
    check_compiles(constraint)


def test_objects_are_closed_unless_they_say_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "open": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
            "shut": {"type": "object", "properties": {"b": {}}},
            "properties": {"type": "object", "properties": {"c": {}}},  # a property's name
            "both": {"allOf": [{"properties": {"d": {}}}, {"properties": {"e": {}}}]},
        },
        "$defs": {"later": {"properties": {"f": {}}}},
    }
    closed = close_objects(schema)
    props = closed["properties"]
    assert closed["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True
    assert props["shut"]["additionalProperties"] is False
    assert props["properties"]["additionalProperties"] is False
    assert all("additionalProperties" not in part for part in props["both"]["allOf"])
    assert closed["$defs"]["later"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left as it was


# -- grammars ------------------------------------------------------------------------------


def _gbnf_chain(length: int) -> str:
    rules = "".join(f"r{i} ::= r{i + 1}\n" for i in range(length))
    return f'root ::= r0\n{rules}r{length} ::= "a"\n'


def test_gbnf_and_lark_grammars_compile() -> None:
    for grammar in (
        'root ::= ("yes" | "no")',
        'root ::= (("a" | "b"))+',
        'root ::= "x"{2,4} [^"\\\\\\x7F\\x00-\\x1F]*',
        'start: "yes" | "no"',  # llguidance's Lark passes through unchanged
    ):
        constraint = constraint_of(None, grammar)
        assert constraint is not None and constraint.source == "grammar"
        check_compiles(constraint)


@pytest.mark.parametrize(
    ("grammar", "says"),
    [
        ("root ::= ((", "does not parse"),
        ('root ::= "a" <|im_end|>', "token literals such as <|im_end|> are not supported"),
        ("root ::= <[2]>", "token literals"),
        ("root ::= " + "(" * 300 + '"a"' + ")" * 300, "nests groups 300 deep; at most 250"),
        ("root ::= " + "<)>" * 3000 + "(" * 2500 + '"a"' + ")" * 2500, "2500 deep"),
        (
            "root ::= r0\n"
            + "".join(f"r{i} ::= r{i + 1}\n" for i in range(6000))
            + 'r6000 ::= "a"',
            f"6002 rules; at most {MAX_GRAMMAR_RULES}",
        ),
        (
            "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(3000)) + 'r3000: "a"\n',
            "3002 rules",
        ),
        ("root ::= foo\n", "foo"),
        (many_rules_grammar(rules=6000, width=2000), "characters; at most"),
    ],
)
def test_grammars_that_cannot_be_taken_are_refused(grammar: str, says: str) -> None:
    error = _refused(grammar=grammar)
    assert error.source == "grammar"
    assert says in str(error), str(error)


def test_the_big_stack_thread_hands_back_results_errors_and_timeouts() -> None:
    assert on_big_stack(lambda: threading.current_thread().name) == "pcrt-grammar"
    with pytest.raises(ZeroDivisionError):
        on_big_stack(lambda: 1 / 0)
    event = threading.Event()
    with pytest.raises(TimeoutError):
        on_big_stack(event.wait, 5, timeout=0.05)
    event.set()
    assert threading.stack_size() == 0  # the process-wide default is left as it was


def test_a_requests_constraint_is_worked_out_once_and_never_outlives_its_fields() -> None:
    """``prepare``'s thread works the constraint out; the scheduler reads the same object.
    A copy with another schema (a DAG node's sampling) must not carry the old one."""
    from pcrt.runtime.engine.sampling import SamplingParams

    first = SamplingParams(json_schema={"type": "object"})
    constraint = first.constraint
    assert constraint is not None and first.constraint is constraint
    reseeded = first.model_copy(update={"seed": 4})
    assert reseeded.constraint is not None and reseeded.constraint.key == constraint.key
    other = first.model_copy(update={"json_schema": {"type": "string"}})
    assert other.constraint is not None and other.constraint.key != constraint.key
    assert first == SamplingParams(json_schema={"type": "object"})  # not a field
    assert "constraint" not in first.model_dump()


def test_a_compile_that_takes_too_long_is_refused() -> None:
    """llguidance has no timeout of its own: the wait for its thread has one."""
    enum = {"enum": [f"v{i}" for i in range(20_000)]}
    constraint = constraint_of(enum, None)
    assert constraint is not None
    with pytest.raises(ConstraintInvalid, match="took more than 0.001 s to compile"):
        check_compiles(constraint, timeout=0.001)


def test_a_schemas_own_llguidance_options_are_refused() -> None:
    """``x-guidance`` would let a schema turn on ``lenient`` (unsupported keywords dropped
    silently) or change JSON's separators."""
    for options in ({"lenient": True}, {"key_separator": "="}, {"coerce_one_of": True}):
        schema = {"type": "array", "uniqueItems": True, "x-guidance": options}
        error = _refused(schema)
        assert error.where == "x-guidance", str(error)


@pytest.mark.parametrize(
    ("schema", "stays_open"),
    [
        # properties merged with anyOf branches: closing would leave only {}
        (
            {
                "type": "object",
                "properties": {"kind": {"type": "string"}},
                "anyOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}],
            },
            ["", "anyOf.0", "anyOf.1"],
        ),
        # "extends": a $ref target under allOf
        (
            {
                "$defs": {"base": {"type": "object", "properties": {"a": {}}}},
                "allOf": [{"$ref": "#/$defs/base"}, {"properties": {"b": {}}, "required": ["b"]}],
            },
            ["$defs.base", "allOf.1"],
        ),
        # a $ref beside properties
        (
            {
                "$defs": {"base": {"type": "object"}},
                "$ref": "#/$defs/base",
                "properties": {"a": {}},
            },
            [""],
        ),
        # required names a key properties do not
        ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, [""]),
    ],
)
def test_objects_whose_properties_merge_with_others_stay_open(
    schema: dict[str, object], stays_open: list[str]
) -> None:
    """Closing never takes away a value the schema allows: each of these compiles, and
    the objects whose properties combine with others' are left as written."""
    from pcrt.runtime.engine.constraints import subschemas

    closed = dict(subschemas(close_objects(schema)))
    for where in stays_open:
        assert "additionalProperties" not in closed[where], where
    constraint = constraint_of(schema, None)
    assert constraint is not None
    check_compiles(constraint)


def test_an_any_of_whole_objects_has_each_closed() -> None:
    person = {"type": "object", "properties": {"name": {}}}
    closed = close_objects({"anyOf": [person, {"type": "null"}]})
    assert closed["anyOf"][0]["additionalProperties"] is False


def test_the_place_named_is_the_one_at_fault() -> None:
    two_refs = {
        "type": "object",
        "$defs": {"A": {"type": "string"}},
        "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/$defs/Missing"}},
    }
    assert _refused(two_refs).where == "properties.b.$ref"
    patterns = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "pattern": "a"},
            "b": {"type": "string", "pattern": "(?=a)b"},
        },
    }
    assert _refused(patterns).where == "properties.b.pattern"


def test_lark_regexes_and_token_ids_are_lark_not_gbnf() -> None:
    """Lark's /regexes/ may hold "<" and quotes; <[id]> is a token in Lark (llguidance's
    syntax), only GBNF's converter cannot take it."""
    for grammar in ("start: /<[a-z]+>/", 'start: /"[^"]*"/ "x"', "start: <[5]>"):
        constraint = constraint_of(None, grammar)
        assert constraint is not None
        check_compiles(constraint)
    assert "token literals" in str(_refused(grammar="root ::= <[5]>"))


class _ByteCompiler(GrammarCompiler):
    """A compiler over llguidance's byte tokenizer: no model needed."""

    def tokenizer(self) -> LLTokenizer:
        return LLTokenizer("byte")


def test_one_grammar_compiles_once_however_many_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    import pcrt.runtime.engine.grammar_compiler as module

    compiles: list[str] = []
    real = module.LLMatcher

    def counting(tokenizer: LLTokenizer, grammar: str, **kw: object) -> LLMatcher:
        compiles.append(grammar)
        time.sleep(0.05)  # long enough for the others to arrive while it compiles
        return real(tokenizer, grammar, **kw)

    monkeypatch.setattr(module, "LLMatcher", counting)
    compiler = _ByteCompiler(None, contextlib.nullcontext)
    good = constraint_of({"type": "object", "properties": {"a": {"type": "integer"}}}, None)
    bad = constraint_of({"type": "string", "pattern": "(?=a)b"}, None)
    assert good is not None and bad is not None
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(compiler.compile, [good] * 4))
    assert len(compiles) == 1 and all(r is results[0] for r in results)
    assert compiler.cached(good) is results[0]
    for _ in range(3):  # a bad schema: refused three times, compiled once
        with pytest.raises(ConstraintInvalid, match="look-around"):
            compiler.compile(bad)
    assert len(compiles) == 2 and compiler.cached(bad) is None
