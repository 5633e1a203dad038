"""Which agent may call which tool: ``[tools.permissions]`` as a pure function.

An agent named in ``agents`` gets its own patterns only; every other agent gets
``default``. Patterns are ``fnmatch`` globs matched case-sensitively against the tool's
name (``files_*``, ``*``). A caller that names no agent (``None``: the daemon's own
code, never an HTTP request, which is at least "anonymous") is not checked.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from pcrt.runtime.tools.settings import ToolPermissions

__all__ = ["DEFAULT_AGENTS", "Permissions"]

DEFAULT_AGENTS = "*"  # how agents_for names every agent that ``agents`` does not


class Permissions:
    def __init__(self, settings: ToolPermissions) -> None:
        self.settings = settings

    def patterns(self, agent: str) -> tuple[str, ...]:
        return self.settings.agents.get(agent, self.settings.default)

    def allowed(self, agent: str | None, tool: str) -> bool:
        if agent is None:
            return True
        return any(fnmatchcase(tool, pattern) for pattern in self.patterns(agent))

    def agents_for(self, tool: str) -> list[str]:
        """The agents named in the config that may call ``tool``, then ``"*"`` when the
        default lets every other agent call it."""
        named = [
            agent
            for agent, patterns in self.settings.agents.items()
            if any(fnmatchcase(tool, p) for p in patterns)
        ]
        if any(fnmatchcase(tool, p) for p in self.settings.default):
            named.append(DEFAULT_AGENTS)
        return named
