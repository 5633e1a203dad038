"""Reading DAG documents from YAML, JSON or TOML into a ``DagSpec``.

Two doors: ``parse_dag_text`` parses the text it is given and never touches the
filesystem (what arrives over HTTP is a document, never a path); ``load_dag`` is the CLI's,
and reads a file when it is given a path (or a one-line string that names one).

Every failure, a syntax error as much as a schema error, becomes one ``DagInvalid`` with a
list of problems naming node and field, so the CLI and the HTTP layer (422) report them the
same way. Duplicate keys are errors in all three formats: YAML and JSON would otherwise
keep the last one silently, and a duplicated node id would vanish.

A shape problem confined to some nodes does not hide the rest: ``parse_dag`` then validates
the DAG of the nodes that parsed (``validate_document``: cycles, references, schemas,
signature, budget; the rejected nodes' raw ``needs`` and templates count) and raises
``ShapeInvalid`` with all of it. Its ``partial`` lets a caller that knows the models and the
library add the checks that need them: ``validate`` (or ``check_run``) of ``partial``
reports every problem of the document, the shape problems first.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from pcrt.runtime.dag.spec import NODE_TYPES, DagSpec
from pcrt.runtime.dag.validate import validate_document
from pcrt.runtime.errors import DagInvalid, Problem, ShapeInvalid
from pcrt.runtime.textcheck import broken_text_at

__all__ = [
    "DagFormat",
    "SUFFIXES",
    "load_dag",
    "looks_like_file_name",
    "parse_dag",
    "parse_dag_text",
    "problems_from",
    "read_document",
]

DagFormat = Literal["yaml", "json", "toml"]

MAX_EXPANDED = 1_000_000  # values in a decoded document, shared ones counted each time
SUFFIXES: dict[str, DagFormat] = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".toml": "toml",
}


def load_dag(path_or_text: str | Path, format: DagFormat | None = None) -> DagSpec:
    """Read a DAG from a file or from text.

    A ``Path``, or a one-line string ending in a known suffix, is a file (its format from
    the suffix unless given); any other string is the document itself: JSON if it starts
    with ``{``, TOML if a line sets ``dag = ...``, else YAML. Pass ``format`` for TOML text
    that does not say ``dag = `` at the top.
    """
    if isinstance(path_or_text, Path) or looks_like_file_name(path_or_text):
        path = Path(path_or_text)
        return parse_dag(read_document(path, format), source=str(path))
    return parse_dag_text(path_or_text, format)


def parse_dag_text(text: str, format: DagFormat | None = None) -> DagSpec:
    """The DAG that ``text`` holds, never a file: a one-line text that names one is parsed
    as the document it is (and fails as one). JSON if it starts with ``{``, TOML if a line
    sets ``dag = ...``, else YAML, unless ``format`` says."""
    return parse_dag(_decode(text, format or _sniff(text), None))


def read_document(path: Path, format: DagFormat | None = None) -> Any:
    """A DAG file decoded but not yet validated (the library peeks at its ``dag`` first);
    a file that cannot be read or decoded raises ``DagInvalid`` naming it."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DagInvalid([Problem(message=f"cannot read {path}: {exc}")]) from None
    fmt = format or SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DagInvalid(
            [Problem(message=f"unknown DAG file type {path.suffix!r} (use .yaml, .json, .toml)")],
            source=source,
        )
    return _decode(text, fmt, source)


def parse_dag(obj: Mapping[str, Any], *, source: str | None = None) -> DagSpec:
    """Validate a decoded document (an API body, say) into a ``DagSpec``."""
    if obj is None:
        raise DagInvalid([Problem(message="the document is empty")], source=source)
    if not isinstance(obj, Mapping):
        raise DagInvalid(
            [Problem(message=f"a DAG document is a mapping, not {type(obj).__name__}")],
            source=source,
        )
    try:
        return DagSpec.model_validate(dict(obj))
    except ValidationError as exc:
        partial = _partial(obj, exc)
        if partial is None:
            raise DagInvalid(problems_from(exc), source=source) from None
    raise ShapeInvalid(partial, validate_document(partial), source=source)


def _partial(obj: Mapping[str, Any], exc: ValidationError) -> DagSpec | None:
    """The DAG of the nodes that passed their shape check, carrying the others' documents
    and the shape problems; None unless every error is inside a node and a node passed."""
    errors = exc.errors()
    nodes = obj.get("nodes")
    if not isinstance(nodes, Mapping) or any(
        len(e["loc"]) < 2 or e["loc"][0] != "nodes" for e in errors
    ):
        return None
    failed = {e["loc"][1] for e in errors}
    try:
        partial = DagSpec.model_validate(
            {**obj, "nodes": {k: v for k, v in nodes.items() if k not in failed}}
        )
    except ValidationError:
        return None  # no node passed
    partial._rejected = {str(k): v for k, v in nodes.items() if k in failed}
    partial._shape_problems = tuple(problems_from(exc))
    return partial


def problems_from(exc: ValidationError) -> list[Problem]:
    """Pydantic's errors as problems: ``nodes.ID.<type>.field`` becomes node ID, field."""
    return [_problem(error) for error in exc.errors()]


def _problem(error: ErrorDetails) -> Problem:
    loc = list(error["loc"])
    node: str | None = None
    if len(loc) >= 2 and loc[0] == "nodes":
        node = str(loc[1])
        loc = loc[2:]
        if loc and loc[0] in NODE_TYPES:  # the union's tag, not a field
            loc = loc[1:]
    message = error["msg"].removeprefix("Value error, ")
    kind = error["type"]
    if kind == "union_tag_invalid":
        given = error.get("ctx", {}).get("tag")
        message = f"unknown node type {given!r} (known: {', '.join(NODE_TYPES)})"
        loc = ["type"]
    elif kind == "union_tag_not_found":
        message = f"a node needs a type (one of {', '.join(NODE_TYPES)})"
        loc = ["type"]
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required"
    elif kind == "string_pattern_mismatch" and loc and loc[-1] in ("dag", "path"):
        message = "a path like /dynamic/NAME or /lib/NAME (letters, digits, '_', '-', '.')"
    elif kind == "string_pattern_mismatch" and loc and loc[-1] == "id":
        message = "a node id is a name: letters, digits and '_', not starting with a digit"
    field = ".".join(str(part) for part in loc) or None
    return Problem(node=node, field=field, message=message)


def _suffixes() -> str:
    return ", ".join(SUFFIXES)


def _expanded_size(data: Any) -> int:
    """How many values ``data`` holds when shared parts count each time they are reached
    (as a dump would write them); counting stops just past ``MAX_EXPANDED``."""
    count, stack = 0, [data]
    while stack and count <= MAX_EXPANDED:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def looks_like_file_name(text: str) -> bool:
    """A one-line text ending in a DAG file's suffix (``plan.yaml``, ``{x.JSON``): what
    ``load_dag`` reads as a path. Pure: it looks at the text, not at the disk."""
    return "\n" not in text and Path(text.strip()).suffix.lower() in SUFFIXES


def _sniff(text: str) -> DagFormat:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return "json"
    if re.search(r"^\s*dag\s*=", text, re.MULTILINE):
        return "toml"
    return "yaml"


def _decode(text: str, fmt: DagFormat, source: str | None) -> Any:
    """The document as data, or DagInvalid: syntax errors, escapes that are not text, and
    YAML aliases that expand past ``MAX_EXPANDED`` values (a "billion laughs")."""
    try:
        if fmt == "json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        elif fmt == "toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        if _expanded_size(data) > MAX_EXPANDED:
            message = f"the document expands to over {MAX_EXPANDED} values (YAML aliases?)"
        elif (where := broken_text_at(data, "the document")) is not None:
            message = f"{where} holds an unpaired UTF-16 surrogate escape: not text"
        else:
            return data
    except json.JSONDecodeError as exc:
        message = f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except tomllib.TOMLDecodeError as exc:
        message = f"TOML syntax error: {exc}"
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = f"YAML syntax error{at}: {exc.problem or exc}"
    except (yaml.YAMLError, _DuplicateKey) as exc:
        message = f"{fmt.upper()} error: {exc}"
    except RecursionError:
        message = f"the {fmt.upper()} document nests too deeply to read"
    raise DagInvalid([Problem(message=message)], source=source)


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # "? [a, b]": a list or mapping as a key
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"a key must be a plain value, not a {type(key).__name__}",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
