"""Tools agents call: HTTP endpoints, MCP servers' tools and Python callables, behind one
registry (``registry.ToolRegistry``) configured by the daemon's ``[tools]`` section
(``settings``). Layer 4, beside routing and models: it imports the engine-free floor
(errors, threads) and its libraries, nothing else of pcrt's.

The kinds' modules (``http_tools``, ``mcp_tools``, ``python_tools``) are imported only
when the config uses them, so a daemon without tools never imports the MCP SDK.
"""

from pcrt.runtime.tools.base import Tool, ToolProblem, ToolResult
from pcrt.runtime.tools.registry import CallObserver, ToolRegistry
from pcrt.runtime.tools.settings import ToolSettings

__all__ = ["CallObserver", "Tool", "ToolProblem", "ToolRegistry", "ToolResult", "ToolSettings"]
