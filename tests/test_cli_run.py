"""``pcrt run`` and ``pcrt chat`` on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from pcrt.cli.main import main


def invoke(*args: str, input: str | None = None):  # noqa: A002 (click's own name)
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_run_streams_an_answer(default_model_path: Path) -> None:
    result = invoke("run", "--temperature", "0", "--max-tokens", "12", "What is 2+2?")
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_run_json_output(default_model_path: Path) -> None:
    result = invoke("run", "--json", "--temperature", "0", "--max-tokens", "8", "Hello")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # a run without a daemon is counted as the daemon counts its requests
    (row,) = json.loads(invoke("usage", "--json").output)
    assert (row["agent"], row["model"], row["requests"]) == ("cli", "smollm2-135m", 1)
    assert row["completion_tokens"] == data["usage"]["completion_tokens"]
    assert data["model"] == "smollm2-135m"
    assert data["usage"]["completion_tokens"] <= 8
    assert data["finish_reason"] in ("stop", "length")
    assert data["timings"]["decode_tokens_per_second"] >= 0


def test_run_with_schema_gives_valid_json(default_model_path: Path, tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    result = invoke(
        "run",
        "--json",
        "--schema",
        str(schema_file),
        "--seed",
        "1",
        "--max-tokens",
        "60",
        "Describe a city as JSON.",
    )
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(json.loads(result.output)["text"]), schema)
    args = ["run", "--verbose", "--schema", str(schema_file), "--max-tokens", "60", "A city?"]
    verbose = invoke(*args)
    assert verbose.exit_code == 0 and "grammar compile:" in verbose.output, verbose.output


def test_run_with_a_schema_it_cannot_honour_says_where(
    default_model_path: Path, tmp_path: Path
) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    result = CliRunner().invoke(main, ["run", "--local", "--schema", str(schema_file), "hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "at uniqueItems: the keyword 'uniqueItems' is not supported" in result.output


def test_run_named_model_and_raw_prompt(default_model_path: Path) -> None:
    result = invoke(
        "run",
        "smollm2",
        "--raw",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        "The capital of France is",
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in json.loads(result.output)["text"]


def test_run_reads_piped_text_as_the_prompt_or_after_it(default_model_path: Path) -> None:
    greedy = ("--json", "--temperature", "0", "--max-tokens", "4")
    alone = invoke("run", *greedy, input="What is the capital of France?")
    dash = invoke("run", *greedy, "-", input="What is the capital of France?")
    named = invoke("run", "smollm2", *greedy, input="What is the capital of France?")
    plain = invoke("run", *greedy, "What is the capital of France?")
    answers = [json.loads(r.output) for r in (alone, dash, named, plain)]
    assert len({a["usage"]["prompt_tokens"] for a in answers}) == 1  # the same prompt
    assert len({a["text"] for a in answers}) == 1

    after = invoke("run", *greedy, "Summarize this:", input="A long note about owls.\n" * 20)
    longer = json.loads(after.output)["usage"]["prompt_tokens"]
    assert longer > answers[0]["usage"]["prompt_tokens"] + 100  # the piped text came along


def test_run_without_a_prompt_is_a_clear_usage_error() -> None:
    for given in ({"input": ""}, {"input": "   \n"}):
        result = CliRunner().invoke(main, ["run"], **given)
        assert result.exit_code == 2
        assert "the prompt is empty" in result.output and "Traceback" not in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("pcrt, version ")


def test_run_unknown_model_is_one_clear_line() -> None:
    result = CliRunner().invoke(main, ["run", "no-such-model", "hi"])
    assert result.exit_code == 1
    assert "unknown model 'no-such-model'" in result.output
    assert "Traceback" not in result.output


def test_run_bad_schema_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["run", "--schema", str(bad), "hi"])
    assert result.exit_code == 1
    assert "not a readable JSON schema" in result.output


def test_run_verbose_in_a_real_process(default_model_path: Path) -> None:
    """The installed console script, as a user runs it."""
    pcrt = Path(sys.executable).with_name("pcrt")
    proc = subprocess.run(
        [str(pcrt), "run", "--verbose", "--temperature", "0", "--max-tokens", "16", "Hi!"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,  # nothing piped in: the prompt is the argument alone
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval rate:" in proc.stderr
    assert "reused prompt tokens:" in proc.stderr
    assert proc.stdout.strip()


def test_chat_keeps_the_conversation_and_reuses_its_kv(default_model_path: Path) -> None:
    result = invoke(
        "chat",
        "--verbose",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        input="My name is Ada.\nWhat is my name?\n/bye\n",
    )
    assert result.exit_code == 0, result.output
    reused = [
        int(line.split(":")[1])
        for line in result.output.splitlines()
        if line.startswith("reused prompt tokens:")
    ]
    assert len(reused) == 2
    assert reused[0] == 0
    assert reused[1] > 20  # the second turn found the first turn's tokens in the slot


def test_chat_reads_fenced_lines_stops_a_reply_on_ctrl_c_and_names_unknown_commands() -> None:
    """The loop with a stand-in model: a message between two triple quotes is one
    message; Ctrl-C during a reply stops it and leaves the turn out; an unknown /command
    is said, not sent; Ctrl-D leaves."""
    from pcrt.cli.chat import _loop
    from pcrt.runtime.engine.chat import ChatMessage

    seen: list[list[str]] = []

    def turn(messages: list[ChatMessage]) -> str:
        seen.append([m.text() for m in messages])
        if messages[-1].text() == "interrupt me":
            raise KeyboardInterrupt  # what Ctrl-C raises while the reply streams
        return f"reply {len(seen)}"

    typed = '"""\nline one\nline two\n"""\ninterrupt me\n/nope\n"""one line"""\n'
    with CliRunner().isolation(input=typed) as (out, err, _):
        _loop("stand-in", None, turn)
    said = err.getvalue().decode()
    assert seen == [
        ["line one\nline two"],
        ["line one\nline two", "reply 1", "interrupt me"],
        ["line one\nline two", "reply 1", "one line"],  # the stopped turn is left out
    ]
    assert "(stopped)" in said and "unknown command /nope" in said


def test_a_spinner_runs_until_the_first_piece_on_a_terminal_only() -> None:
    import io
    import time

    from rich.console import Console

    from pcrt.cli.run import until_first

    def slow() -> Iterator[str]:
        time.sleep(0.5)  # a model loading on first use
        yield from ("a", "b")

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=80)
    assert list(until_first(slow(), "the daemon is loading the model", terminal)) == ["a", "b"]
    assert "the daemon is loading the model..." in screen.getvalue()

    piped = io.StringIO()
    quiet = Console(file=piped, force_terminal=False)
    assert list(until_first(slow(), "loading", quiet)) == ["a", "b"]
    assert piped.getvalue() == ""  # nothing but the answer when not at a terminal


def test_a_model_the_cli_loads_itself_has_a_spinner_on_a_terminal_only(
    default_model_path: Path,
) -> None:
    import io

    from rich.console import Console

    from pcrt.cli.progress import load_model
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=80)
    with load_model(registry, None, console=terminal, parallel=1, context=256) as engine:
        assert engine.name == "smollm2-135m"
    assert "loading smollm2-135m..." in screen.getvalue()
    piped = io.StringIO()
    with load_model(registry, None, console=Console(file=piped, force_terminal=False)):
        pass
    assert piped.getvalue() == ""


def test_run_takes_unquoted_words_and_a_model_named_first() -> None:
    from pcrt.cli.run import _model_and_prompt
    from pcrt.runtime.errors import ModelNotFound
    from pcrt.runtime.models.registry import Registry

    registry = Registry.load()
    assert _model_and_prompt(("Tell", "me", "a", "joke"), registry) == (None, "Tell me a joke")
    assert _model_and_prompt(("smollm2", "Tell", "me"), registry) == ("smollm2", "Tell me")
    assert _model_and_prompt(("smollm2",), registry) == ("smollm2", "")
    assert _model_and_prompt(("What is 2+2?",), registry) == (None, "What is 2+2?")
    assert _model_and_prompt(("-",), registry) == (None, "-")
    with pytest.raises(ModelNotFound, match="did you mean 'smollm2'"):
        _model_and_prompt(("smolm2", "hi"), registry)  # shaped like a name: not a prompt


def test_a_model_name_alone_at_a_terminal_opens_a_chat(
    default_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pcrt.cli.run._at_terminal", lambda: True)
    result = invoke("run", "smollm2", input="/bye\n")
    assert result.exit_code == 0, result.output
    assert "chatting with smollm2-135m" in result.output
