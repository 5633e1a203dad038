"""A call's arguments checked against its tool's JSON schema, before anything is sent.

A tool must never see arguments its schema refuses: an HTTP tool would get a body it
cannot parse, an MCP server an error it words its own way, and a DAG node would record a
call that could only fail. The refusal names the argument's path, so a model (or its
author) can fix it in one round. Validators are built once per tool, when the registry
starts; a check runs in a worker thread (arguments of up to a request body's bound,
and a schema's patterns, can take more than a millisecond).
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from pcrt.runtime.errors import InvalidRequest
from pcrt.runtime.threads import to_thread_to_completion

__all__ = ["ArgumentCheck"]


class ArgumentCheck:
    """The validator of one tool's parameters."""

    def __init__(self, tool: str, schema: dict[str, Any]) -> None:
        cls = validator_for(schema, default=Draft202012Validator)
        self.tool = tool
        self.validator: Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)

    def problem(self, arguments: Any) -> InvalidRequest | None:
        """The error that refuses ``arguments``, or None when they fit."""
        if not isinstance(arguments, dict):
            error = InvalidRequest(f"tool {self.tool!r}: arguments must be a JSON object")
            error.param = "arguments"
            return error
        found = best_match(self.validator.iter_errors(arguments))
        if found is None:
            return None
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in found.absolute_path)
        error = InvalidRequest(f"tool {self.tool!r}: arguments{path}: {found.message}")
        error.param = f"arguments{path}"
        return error

    async def check(self, arguments: Any) -> None:
        """``InvalidRequest`` naming the first argument at fault (off the event loop)."""
        error = await to_thread_to_completion(self.problem, arguments)
        if error is not None:
            raise error
