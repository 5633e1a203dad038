"""The CLI habits people bring from Ollama and other tools: shell completion that
really completes, the model commands without ``models``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcrt.cli.main import main

PCRT = str(Path(sys.executable).with_name("pcrt"))


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete --no-files")],
)
def test_completion_prints_each_shells_script(shell: str, marker: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0 and "_PCRT_COMPLETE" in result.output
    assert marker in result.output


def test_the_script_completes_commands_and_options() -> None:
    """What bash asks the installed console script when TAB is pressed."""

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
            "_PCRT_COMPLETE": "bash_complete",
        }
        done = subprocess.run(
            [PCRT], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        assert done.returncode == 0, done.stderr
        return [line.split(",", 1)[1] for line in done.stdout.splitlines() if "," in line]

    assert complete("pcrt se") == ["serve", "service"]
    assert complete("pcrt service i") == ["install"]
    assert "--port" in complete("pcrt serve --po")
    assert complete("pcrt completion f") == ["fish"]


def test_unknown_shell_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["completion", "powershell"])
    assert result.exit_code == 2 and "powershell" in result.output


def test_model_commands_answer_without_models() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["list"]).output == runner.invoke(main, ["models", "list"]).output
    shown = runner.invoke(main, ["show", "--json", "smollm2"])
    assert shown.exit_code == 0 and '"smollm2-135m"' in shown.output
    unknown = runner.invoke(main, ["rm", "no-such-model"])
    assert unknown.exit_code == 1 and "unknown model 'no-such-model'" in unknown.output


def test_usage_keeps_one_line_per_row_at_80_columns() -> None:
    from rich.console import Console

    from pcrt.cli.usage import usage_table

    row = {
        "agent": "a-very-long-agent-name-from-some-framework-0123456789",
        "model": "smollm2-135m",
        "requests": 12,
        "errors": 0,
        "on_peers": 0,
        "fell_back": 0,
        "prompt_tokens": 123456,
        "cached_tokens": 65432,
        "completion_tokens": 7890,
        "avg_ttft_ms": 140.2,
        "last": "2026-12-05T13:29:35.123456+00:00",
    }
    console = Console(width=80, record=True)
    console.print(usage_table([row, {**row, "agent": "short", "errors": 2}], 80))
    lines = console.export_text().splitlines()
    assert len(lines) == 3  # the header and one line per row: nothing folded
    assert "ERR" in lines[0] and "PEERS" not in lines[0]  # only the columns in use
    assert lines[1].startswith("a-very-long-") and "…" in lines[1]
    assert "12-05 13:29" in lines[1] and "123456" in lines[1] and "140 ms" in lines[1]
