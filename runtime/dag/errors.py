"""Errors of the DAG layer, and the ``Problem`` record validation reports.

    PcrtError
    ├── InvalidRequest
    │   ├── DagInvalid     the document does not parse, or validation found problems (422)
    │   └── RenderFailed   a template could not be rendered with the run's values
    └── AssertFailed       an ``assert`` node's expression was false (fails the run)

A ``DagInvalid`` carries every problem found, not only the first, so that an author (or an
agent generating DAGs) fixes them in one round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from pcrt.runtime.errors import InvalidRequest, PcrtError

__all__ = ["AssertFailed", "DagInvalid", "Problem", "RenderFailed"]


class Problem(BaseModel):
    """One thing wrong with a DAG: which node (None for the document), which field, what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str | None = None
    field: str | None = None
    message: str

    def __str__(self) -> str:
        where = []
        if self.node is not None:
            where.append(f"node {self.node!r}")
        if self.field is not None:
            where.append(self.field)
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DagInvalid(InvalidRequest):
    """A DAG that does not parse or does not validate; ``problems`` lists all of it."""

    def __init__(self, problems: Iterable[Problem], *, source: str | None = None) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        head = f"invalid DAG{f' {source}' if source else ''}"
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{head}: {count} {noun}\n{lines}" if count else head)

    def to_list(self) -> list[dict[str, Any]]:
        """The problems as plain dicts (the body of an HTTP 422)."""
        return [p.model_dump() for p in self.problems]


class RenderFailed(InvalidRequest):
    """A prompt or input template failed at run time (an undefined value, a sandbox refusal)."""

    def __init__(self, template: str, reason: str, *, node: str | None = None) -> None:
        self.template = template
        self.reason = reason
        self.node = node
        where = f"node {node!r}: " if node else ""
        super().__init__(f"{where}cannot render {_clip(template)!r}: {reason}")


class AssertFailed(PcrtError):
    """An assertion did not hold; the message shows the expression and the values it read."""

    def __init__(
        self,
        expression: str,
        values: Mapping[str, str],
        *,
        node: str | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        self.expression = expression
        self.values = dict(values)
        self.node = node
        self.reason = reason
        where = f"node {node!r}: " if node else ""
        if message:
            where += f"{message}: "
        what = f"could not evaluate ({reason})" if reason else "is false"
        shown = "; ".join(f"{name} = {value}" for name, value in self.values.items())
        tail = f" with {shown}" if shown else ""
        super().__init__(f"{where}assertion {expression!r} {what}{tail}")


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
