"""The one exception tree: runtime/errors.py defines every PcrtError and its docstring
draws each of them under its real parent, so the drawing cannot drift from the code."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pcrt.cli
import pcrt.routing
import pcrt.runtime
from pcrt.runtime import errors

_BRANCH = re.compile(r"^    (?P<indent>(?:[│ ]   )*)(?:[├└]── )(?P<name>[A-Z]\w+)")


def _drawn_parents() -> dict[str, str]:
    """Each class the docstring draws, with the class drawn above it."""
    assert errors.__doc__ is not None
    parents: dict[str, str] = {}
    stack = ["PcrtError"]
    for line in errors.__doc__.splitlines():
        match = _BRANCH.match(line)
        if match is None:
            continue
        depth = len(match["indent"]) // 4 + 1
        del stack[depth:]
        parents[match["name"]] = stack[-1]
        stack.append(match["name"])
    return parents


def _tree() -> dict[str, type[errors.PcrtError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.PcrtError)
    }


def test_the_docstring_draws_every_error_under_its_parent() -> None:
    drawn = _drawn_parents()
    actual = {
        name: cls.__bases__[0].__name__
        for name, cls in _tree().items()
        if cls is not errors.PcrtError
    }
    assert drawn == actual
    assert sorted(errors.__all__) == sorted([*_tree(), "Problem"])


def test_no_error_of_pcrt_is_defined_outside_the_tree() -> None:
    outside = []
    for package in (pcrt.runtime, pcrt.routing, pcrt.cli):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name == errors.__name__:
                continue
            for name, value in vars(importlib.import_module(module.name)).items():
                if (
                    isinstance(value, type)
                    and issubclass(value, errors.PcrtError)
                    and value.__module__ == module.name
                ):
                    outside.append(f"{module.name}.{name}")
    assert outside == []
