"""``[tools]`` in the daemon's config file: what it accepts, and the one-line error that
names the file and the key for what it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pcrt.runtime.errors import ConfigError
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.tools import ToolSettings

CONFIG = """
[server]
port = 11999

[[tools.http]]
name = "weather"
description = "Current weather for a city"
url = "http://127.0.0.1:9000/weather"
method = "POST"
headers_env = { Authorization = "WEATHER_TOKEN" }
parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }
timeout = 10
idempotent = true

[[tools.mcp]]
name = "files"
command = ["python", "server.py"]
env = { ROOT = "/srv" }
prefix = "files_"
timeout = 30
idempotent = ["read_file"]

[[tools.mcp]]
name = "search"
url = "http://127.0.0.1:8765/mcp"

[[tools.python]]
name = "add"
entry_point = "tests.tool_functions:add"
idempotent = true

[tools.permissions]
default = ["*"]
agents = { crawler = ["weather"], coder = ["files_*"] }
"""


def test_the_documented_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG, encoding="utf-8")
    settings = ServerSettings.load(path)
    tools = settings.tools
    assert settings.port == 11999
    assert [t.name for t in tools.http] == ["weather"]
    assert tools.http[0].headers_env == {"Authorization": "WEATHER_TOKEN"}
    files, search = tools.mcp
    assert files.command == ["python", "server.py"] and search.url is not None
    assert files.is_idempotent("read_file") and not files.is_idempotent("write_file")
    assert tools.permissions.agents["coder"] == ("files_*",)
    assert tools.python[0].entry_point == "tests.tool_functions:add"


def test_no_tools_section_is_no_tools(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[server]\nport = 11999\n", encoding="utf-8")
    tools = ServerSettings.load(path).tools
    assert tools.empty and tools.permissions.default == ("*",)


@pytest.mark.parametrize(
    ("section", "key", "why"),
    [
        (
            '[[tools.http]]\nname = "a b"\nurl = "http://h/x"',
            "tools.http.0.name",
            "should match pattern",
        ),
        (
            '[[tools.http]]\nname = "x"\nurl = "ftp://h/x"',
            "tools.http.0.url",
            "is not an http:// or https:// URL",
        ),
        (
            '[[tools.http]]\nname = "x"\nurl = "http://h/x"\nparameters = { type = "string" }',
            "tools.http.0.parameters",
            'the schema of an object (type = "object")',
        ),
        (
            '[[tools.http]]\nname = "x"\nurl = "http://h/x"\n'
            'parameters = { type = "object", properties = { a = { type = "strung" } } }',
            "tools.http.0.parameters",
            "not a JSON schema at properties/a/type",
        ),
        (
            '[[tools.http]]\nname = "x"\nurl = "http://h/x"\nheaders_env = { A = "tok en" }',
            "tools.http.0.headers_env",
            "is not an environment variable's name",
        ),
        (
            '[[tools.http]]\nname = "x"\nurl = "http://h/x"\nheaders = { A = "b" }',
            "tools.http.0.headers",
            "unknown key",
        ),
        (
            '[[tools.mcp]]\nname = "m"\ncommand = ["x"]\nurl = "http://h/mcp"',
            "tools.mcp.0",
            "set exactly one of command and url",
        ),
        ('[[tools.mcp]]\nname = "m"', "tools.mcp.0", "set exactly one of command and url"),
        ('[[tools.mcp]]\nname = "m"\ncommand = []', "tools.mcp.0.command", "at least 1"),
        (
            '[[tools.python]]\nname = "p"\nentry_point = "no_colon"',
            "tools.python.0.entry_point",
            "should match pattern",
        ),
        (
            '[[tools.http]]\nname = "x"\nurl = "http://h/x"\n'
            '[[tools.python]]\nname = "x"\nentry_point = "m:f"',
            "tools",
            "two tools are named 'x'",
        ),
        (
            '[[tools.mcp]]\nname = "m"\ncommand = ["a"]\n[[tools.mcp]]\nname = "m"\nurl = "http://h"',
            "tools",
            "two MCP servers are named 'm'",
        ),
        ("[tools]\nshell = true", "tools.shell", "unknown key"),
    ],
)
def test_a_bad_entry_names_the_file_and_the_key(
    tmp_path: Path, section: str, key: str, why: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(section + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        ServerSettings.load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert why in message


def _settings(**tools: Any) -> ToolSettings:
    return ToolSettings.model_validate(tools)


def test_settings_are_frozen() -> None:
    settings = _settings(http=[{"name": "x", "url": "http://h/x"}])
    with pytest.raises(ValidationError):
        settings.http[0].name = "y"
