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

    assert complete("pcrt se") == ["serve"]
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
