"""``pcrt chat`` against a running ``pcrt serve``: the turns go through the daemon, and the
second turn finds the first one's tokens in the daemon's slot."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog
from pcrt.cli.main import main
from pcrt.runtime.paths import Paths
from tests.peering import wait_for
from tests.test_daemon_cli import running_serve


@pytest.fixture
def daemon_url(
    default_model_path: Path, pcrt_env: Paths, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    # one thread: immune to llama.cpp threads spinning at barriers on 2 shared cores
    with running_serve(monkeypatch, parallel=1, threads=1) as (url, _):
        yield url


def _figures(output: str, label: str) -> list[int]:
    return [int(n) for n in re.findall(rf"^{label}:\s+(\d+)", output, flags=re.MULTILINE)]


def test_chat_goes_through_the_daemon_and_reuses_the_first_turn(
    daemon_url: str, pcrt_env: Paths
) -> None:
    result = CliRunner().invoke(
        main,
        ["chat", "--verbose", "--temperature", "0", "--max-tokens", "8"],
        input="My name is Ada.\nWhat is my name?\n/bye\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("(through the daemon)") == 2, result.output
    prompts = _figures(result.output, "prompt eval count")
    reused = _figures(result.output, "reused prompt tokens")
    assert len(prompts) == 2 and len(reused) == 2, result.output
    assert reused[0] == 0  # a fresh daemon: nothing to reuse
    # the whole first prompt is found again; only the reply and the new turn are computed
    assert prompts[0] - 1 <= reused[1] < prompts[1]
    # the daemon served both turns (the chat process loaded no model of its own); it
    # writes a turn's usage row after its answer, from a queue: wait for the second
    with Store(pcrt_env.db_path) as store:
        wait_for(lambda: len(UsageLog(store).rows()) >= 2, 10, "both turns' usage rows")
        rows = UsageLog(store).rows()
    assert [(r["route"], r["status"]) for r in rows] == [("/v1/chat/completions", 200)] * 2
    assert [r["cached_tokens"] for r in rows] == reused
