"""What the tool registry is configured with: the ``[tools]`` section of the daemon's
config file (see ``pcrt.runtime.server.settings`` for the whole file)::

    [[tools.http]]                    # one HTTP endpoint is one tool
    name = "weather"                  # OpenAI's function-name rule: ^[A-Za-z0-9_-]{1,64}$
    description = "Current weather for a city"
    url = "http://127.0.0.1:9000/weather"
    method = "POST"                   # POST: the arguments as a JSON body; GET: query params
    headers_env = { Authorization = "WEATHER_TOKEN" }  # value read from the env at call time
    parameters = { type = "object", properties = { city = { type = "string" } } }
    timeout = 10                      # seconds
    idempotent = true                 # may be sent again after a crash (default false)
    max_response_bytes = 1048576      # a longer answer is the tool's error, never read whole

    [[tools.mcp]]                     # an MCP server: its tools are listed from it
    name = "files"                    # the server's name (the tools' "source")
    command = ["python", "server.py"] # stdio (with env, cwd) ... or
    # url = "http://127.0.0.1:8765/mcp"   # streamable HTTP (with headers_env)
    prefix = "files_"                 # tool names become prefix + the server's name
    timeout = 30                      # per call
    connect_timeout = 10              # start, handshake and listing
    idempotent = ["read_file"]        # the server's own tool names, or true / false for all

    [[tools.python]]                  # a Python callable, imported at start
    name = "add"
    entry_point = "mypkg.tools:add"   # module:attribute; sync ones run on a thread
    idempotent = true                 # parameters: from the signature unless given

    [tools.permissions]               # per agent (X-PC-Agent-ID), glob patterns of names
    default = ["*"]                   # every agent not named below
    agents = { crawler = ["weather"], coder = ["files_*"] }

Secrets never sit in this file's tool entries by design: headers come from environment
variables named here and read at call time, and nothing here is listed but names,
descriptions, schemas and where a tool lives (``source``).
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "NAME_PATTERN",
    "HttpToolSettings",
    "McpServerSettings",
    "PythonToolSettings",
    "ToolPermissions",
    "ToolSettings",
    "check_parameters",
]

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_MIB = 1024**2


def check_parameters(schema: Any) -> dict[str, Any]:
    """``schema`` if it is a JSON schema of an object (what a function's parameters
    are), else ``ValueError`` saying where it breaks the metaschema."""
    if not isinstance(schema, dict):
        raise ValueError("parameters must be a JSON schema object")
    if schema.get("type") != "object":
        raise ValueError('parameters must be the schema of an object (type = "object")')
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        at = f" at {where}" if where else ""
        raise ValueError(f"not a JSON schema{at}: {exc.message}") from None
    return schema


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HttpToolSettings(_Frozen):
    """One HTTP endpoint as one tool."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    url: str
    method: Literal["GET", "POST"] = "POST"
    # header name -> the environment variable that holds its value (read at call time)
    headers_env: dict[str, str] = {}
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    timeout: float = Field(default=10.0, gt=0)
    idempotent: bool = False
    max_response_bytes: int = Field(default=_MIB, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_parameters(value)

    @field_validator("headers_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env_names(value)


class McpServerSettings(_Frozen):
    """An MCP server over stdio (``command``) or streamable HTTP (``url``)."""

    name: str = Field(pattern=NAME_PATTERN)
    command: list[str] | None = Field(default=None, min_length=1)
    url: str | None = None
    env: dict[str, str] = {}  # stdio: added to the few variables the SDK passes on (PATH, HOME)
    cwd: str | None = None  # stdio: where the command runs (default: the daemon's directory)
    headers_env: dict[str, str] = {}  # url: header name -> environment variable
    prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_-]*$")
    timeout: float = Field(default=30.0, gt=0)  # per call
    connect_timeout: float = Field(default=10.0, gt=0)  # start, handshake, listing
    idempotent: bool | list[str] = False  # the server's own tool names (without prefix)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_validator("headers_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env_names(value)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: set exactly one of command and url")
        if self.url is not None and (self.env or self.cwd):
            raise ValueError(f"MCP server {self.name!r}: env and cwd are for command servers")
        if self.command is not None and self.headers_env:
            raise ValueError(f"MCP server {self.name!r}: headers_env is for url servers")
        return self

    def is_idempotent(self, tool: str) -> bool:
        """Whether the server's tool ``tool`` (its own name, no prefix) may be resent."""
        return self.idempotent if isinstance(self.idempotent, bool) else tool in self.idempotent


class PythonToolSettings(_Frozen):
    """A Python callable (``module:attribute``), imported when the registry starts."""

    name: str = Field(pattern=NAME_PATTERN)
    entry_point: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    description: str | None = None  # default: the callable's docstring
    parameters: dict[str, Any] | None = None  # default: from its signature
    timeout: float = Field(default=30.0, gt=0)
    idempotent: bool = False

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_parameters(value)


class ToolPermissions(_Frozen):
    """Which tools each agent may call: glob patterns (``fnmatch``, case-sensitive) of
    tool names. An agent named in ``agents`` gets its own list only, not ``default`` too."""

    default: tuple[str, ...] = ("*",)
    agents: dict[str, tuple[str, ...]] = {}


class ToolSettings(_Frozen):
    http: tuple[HttpToolSettings, ...] = ()
    mcp: tuple[McpServerSettings, ...] = ()
    python: tuple[PythonToolSettings, ...] = ()
    permissions: ToolPermissions = ToolPermissions()

    @model_validator(mode="after")
    def _unique(self) -> ToolSettings:
        named: list[HttpToolSettings | PythonToolSettings] = [*self.http, *self.python]
        _no_duplicates("tool", [t.name for t in named])
        _no_duplicates("MCP server", [s.name for s in self.mcp])
        return self

    @property
    def empty(self) -> bool:
        return not (self.http or self.mcp or self.python)


def _no_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"two {what}s are named {name!r}")
        seen.add(name)


def _check_env_names(value: dict[str, str]) -> dict[str, str]:
    for header, variable in value.items():
        if not re.match(_ENV_NAME, variable):
            raise ValueError(
                f"header {header!r}: {variable!r} is not an environment variable's name "
                "(the value itself never goes in the config)"
            )
    return value
