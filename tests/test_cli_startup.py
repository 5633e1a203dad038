"""``pcrt`` starts without importing what its command does not use.

Each case runs the command in a fresh interpreter and lists the modules it imported: no
timings (they flake on a shared machine), only which heavy modules stayed out.
``python -m bench.cli`` measures the start times themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pcrt.cli.main import COMMANDS, main

# what no command needs to start, or to find that no daemon answers
HEAVY = (
    "llama_cpp",
    "fastapi",
    "starlette",
    "uvicorn",
    "aiohttp",
    "zeroconf",
    "jinja2",
    "sqlite_utils",
    "pcrt.runtime.engine",
    "pcrt.runtime.server",
    "pcrt.runtime.dag",
    "pcrt.routing",
)

# the interpreter runs the CLI as the `pcrt` script does, then lists its modules
_RUN = """
import json, sys
from pcrt.cli.main import main
out, args = sys.argv[1], sys.argv[2:]
try:
    main(args)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def imported(tmp_path: Path, *args: str) -> tuple[int, set[str], str]:
    """(exit code, imported modules, output) of ``pcrt ARGS`` in a fresh interpreter."""
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.exists(), done.stderr
    data = json.loads(out.read_text())
    return data["code"], set(data["modules"]), done.stdout + done.stderr


def loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


@pytest.mark.parametrize(
    ("args", "code", "also_absent"),
    [
        (("--help",), 0, ("httpx", "rich", "pydantic")),
        # PCRT_URL points at port 9 (conftest): no daemon answers there
        (("ps",), 1, ("pydantic",)),
        (("models", "list"), 0, ("httpx",)),
    ],
    ids=["help", "ps", "models-list"],
)
def test_a_command_imports_only_what_it_uses(
    tmp_path: Path, args: tuple[str, ...], code: int, also_absent: tuple[str, ...]
) -> None:
    exit_code, modules, output = imported(tmp_path, *args)
    assert exit_code == code, output
    present = [name for name in (*HEAVY, *also_absent) if loaded(modules, name)]
    assert present == [], f"pcrt {' '.join(args)} imported {present}"


def test_ps_says_no_daemon_answers(tmp_path: Path) -> None:
    _, _, output = imported(tmp_path, "ps")
    assert "no pcrt daemon answers at http://127.0.0.1:9" in output


def test_help_lists_every_command_with_its_help(tmp_path: Path) -> None:
    _, _, output = imported(tmp_path, "--help")
    listed = output.split("Commands:", 1)[1].splitlines()
    for name in COMMANDS:
        line = next((row for row in listed if row.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from pcrt --help"
        assert len(line.split()) > 1, f"{name} has no help line"


def test_every_lazy_command_resolves_to_its_name() -> None:
    ctx = click.Context(main)
    assert isinstance(main, click.Group)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
