"""The JSON schemas structured output is held to (issue 17): 40 of the kinds agents use.

Each is a ``Case``: a name, a prompt that asks for what the schema describes, and the
schema. Free strings carry ``maxLength`` and arrays ``maxItems``: that is how a user
bounds a constrained generation (a 135M model left unbounded may write one string until
``max_tokens``), and the corpus is about the constraint, not about the model's stamina.

Features, each in several cases: nested objects, arrays with ``minItems``/``maxItems``,
``enum``, ``const``, ``anyOf``/``oneOf``, ``$ref``/``$defs``, ``pattern``, string
``format`` (date-time, uuid, email), number bounds, ``additionalProperties: false``,
``required``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CORPUS", "Case"]


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    schema: dict[str, Any]


def _text(n: int = 40) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """An object with exactly these properties, all required unless said."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_PERSON = _closed({"name": _text(), "age": {"type": "integer", "minimum": 0, "maximum": 120}})
_ADDRESS = _closed(
    {"street": _text(), "city": _text(30), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}
)

CORPUS: tuple[Case, ...] = (
    # -- flat objects ---------------------------------------------------------------------
    Case("person", "Describe a person.", _PERSON),
    Case("book", "Describe a book.", _closed({"title": _text(), "year": {"type": "integer"}})),
    Case("flag", "Is water wet?", _closed({"answer": {"type": "boolean"}})),
    Case(
        "optional field",
        "Describe a city.",
        _closed({"name": _text(), "population": {"type": "integer"}}, required=["name"]),
    ),
    Case(
        "score", "Rate a film.", _closed({"score": {"type": "number", "minimum": 0, "maximum": 10}})
    ),
    Case(
        "exclusive bounds",
        "Give a probability.",
        _closed({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
    ),
    Case(
        "integer range",
        "Pick a day of the month.",
        _closed({"day": {"type": "integer", "minimum": 1, "maximum": 31}}),
    ),
    Case(
        "null allowed",
        "Give a middle name, if any.",
        _closed({"middle": {"type": ["string", "null"], "maxLength": 20}}),
    ),
    # -- nested objects ------------------------------------------------------------------
    Case(
        "nested person",
        "Describe a person and where they live.",
        _closed({"person": _PERSON, "address": _ADDRESS}),
    ),
    Case(
        "three levels",
        "Describe a company, its boss and the boss's pet.",
        _closed(
            {
                "company": _text(),
                "boss": _closed({"name": _text(), "pet": _closed({"kind": _text(20)})}),
            }
        ),
    ),
    Case(
        "nested optional",
        "Describe a laptop.",
        _closed(
            {
                "model": _text(),
                "specs": _closed(
                    {"ram_gb": {"type": "integer"}, "gpu": _text(30)}, required=["ram_gb"]
                ),
            }
        ),
    ),
    # -- arrays --------------------------------------------------------------------------
    Case(
        "keywords",
        "List keywords about the sea.",
        _closed({"keywords": {"type": "array", "items": _text(20), "minItems": 2, "maxItems": 5}}),
    ),
    Case(
        "exactly three",
        "Name three colours.",
        _closed({"colours": {"type": "array", "items": _text(15), "minItems": 3, "maxItems": 3}}),
    ),
    Case(
        "numbers",
        "Give some small numbers.",
        _closed(
            {
                "values": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 99},
                    "maxItems": 6,
                }
            }
        ),
    ),
    Case(
        "array of objects",
        "List two people.",
        _closed({"people": {"type": "array", "items": _PERSON, "minItems": 1, "maxItems": 2}}),
    ),
    Case(
        "top-level array",
        "List up to four fruits.",
        {"type": "array", "items": _text(15), "minItems": 1, "maxItems": 4},
    ),
    Case(
        "nested arrays",
        "Give a small grid of digits.",
        _closed(
            {
                "grid": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),
    # -- enum and const ------------------------------------------------------------------
    Case(
        "sentiment",
        "How does 'I love it' feel?",
        _closed({"sentiment": {"enum": ["positive", "negative", "neutral"]}}),
    ),
    Case(
        "priority",
        "Set a ticket's priority.",
        _closed({"priority": {"type": "integer", "enum": [1, 2, 3]}}),
    ),
    Case(
        "const",
        "Say which API version you speak.",
        _closed({"version": {"const": "v1"}, "ok": {"type": "boolean"}}),
    ),
    Case(
        "enum array",
        "Tag a news article.",
        _closed(
            {
                "tags": {
                    "type": "array",
                    "items": {"enum": ["politics", "sport", "science", "art"]},
                    "minItems": 1,
                    "maxItems": 3,
                }
            }
        ),
    ),
    Case("mixed enum", "Pick a value.", _closed({"value": {"enum": ["auto", 0, 1, True, None]}})),
    # -- anyOf / oneOf -------------------------------------------------------------------
    Case(
        "anyOf scalar",
        "Give an id, a number or a name.",
        # the integer bounded, as a schema for a small model should be: unbounded, greedy
        # 135M in some batch shapes wrote digits until max_tokens (256), in CI
        _closed(
            {
                "id": {
                    "anyOf": [{"type": "integer", "minimum": -999999, "maximum": 999999}, _text(12)]
                }
            }
        ),
    ),
    Case(
        "oneOf shapes",
        "Describe a shape.",
        {
            "oneOf": [
                _closed({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}),
                _closed({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}}),
            ]
        },
    ),
    Case(
        "anyOf objects",
        "Report a result.",
        {
            "anyOf": [
                _closed({"ok": {"const": True}, "value": _text()}),
                _closed({"ok": {"const": False}, "error": _text()}),
            ]
        },
    ),
    Case(
        "nullable object",
        "Give the manager of a team, if there is one.",
        _closed({"manager": {"anyOf": [_PERSON, {"type": "null"}]}}),
    ),
    # -- $ref / $defs --------------------------------------------------------------------
    Case(
        "ref",
        "Describe two people.",
        {
            "$defs": {"person": _PERSON},
            **_closed({"a": {"$ref": "#/$defs/person"}, "b": {"$ref": "#/$defs/person"}}),
        },
    ),
    Case(
        "ref in array",
        "List addresses.",
        {
            "$defs": {"address": _ADDRESS},
            **_closed(
                {
                    "addresses": {
                        "type": "array",
                        "items": {"$ref": "#/$defs/address"},
                        "minItems": 1,
                        "maxItems": 2,
                    }
                }
            ),
        },
    ),
    Case(
        "nested refs",
        "Describe an order.",
        {
            "$defs": {
                "item": _closed(
                    {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    }
                ),
                "order": _closed(
                    {
                        "items": {
                            "type": "array",
                            "items": {"$ref": "#/$defs/item"},
                            "minItems": 1,
                            "maxItems": 3,
                        }
                    }
                ),
            },
            **_closed({"order": {"$ref": "#/$defs/order"}}),
        },
    ),
    Case(
        "recursive ref",
        # the 135M model, greedy, nests forever when asked to invent a tree: it is shown one
        'Write this tree as JSON: {"label": "food", "children": [{"label": "fruit", '
        '"children": []}, {"label": "bread", "children": []}]}',
        {
            "$defs": {
                "node": _closed(
                    {
                        "label": _text(15),
                        "children": {
                            "type": "array",
                            "items": {"$ref": "#/$defs/node"},
                            "maxItems": 2,
                        },
                    },
                )
            },
            "$ref": "#/$defs/node",
        },
    ),
    # -- pattern -------------------------------------------------------------------------
    Case(
        "zip", "Give a US zip code.", _closed({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})
    ),
    Case(
        "phone",
        "Give a phone number.",
        _closed({"phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{4}$"}}),
    ),
    Case(
        "code",
        "Give a product code.",
        _closed({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}}),
    ),
    Case(
        "slug",
        "Give a URL slug for a blog post.",
        _closed({"slug": {"type": "string", "pattern": "^[a-z]+(-[a-z]+){0,3}$"}}),
    ),
    # -- format --------------------------------------------------------------------------
    Case(
        "date-time",
        "When did the meeting start?",
        _closed({"start": {"type": "string", "format": "date-time"}}),
    ),
    Case("uuid", "Give the request id.", _closed({"id": {"type": "string", "format": "uuid"}})),
    Case(
        "email",
        "Give a contact email.",
        _closed({"email": {"type": "string", "format": "email", "maxLength": 40}}),
    ),
    Case(
        "event",
        "Describe an event with its id, time and organiser's email.",
        _closed(
            {
                "id": {"type": "string", "format": "uuid"},
                "at": {"type": "string", "format": "date-time"},
                "organiser": {"type": "string", "format": "email", "maxLength": 40},
            }
        ),
    ),
    # -- strings bounded -----------------------------------------------------------------
    Case(
        "short answer",
        "What is the capital of France?",
        _closed({"answer": {"type": "string", "minLength": 1, "maxLength": 20}}),
    ),
    Case(
        "kitchen sink",
        "Describe a job posting.",
        {
            "$defs": {
                "salary": _closed(
                    {
                        "min": {"type": "integer", "minimum": 0},
                        "max": {"type": "integer", "minimum": 0},
                    }
                )
            },
            **_closed(
                {
                    "title": _text(),
                    "remote": {"type": "boolean"},
                    "level": {"enum": ["junior", "senior", "lead"]},
                    "salary": {"$ref": "#/$defs/salary"},
                    "skills": {"type": "array", "items": _text(15), "minItems": 1, "maxItems": 3},
                    "contact": {
                        "anyOf": [
                            {"type": "string", "format": "email", "maxLength": 40},
                            {"type": "null"},
                        ]
                    },
                },
                required=["title", "remote", "level", "skills"],
            ),
        },
    ),
)
