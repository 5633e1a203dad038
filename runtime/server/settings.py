"""The daemon's settings: CLI flags over a TOML config file over defaults.

The config file is ``PCRT_CONFIG`` or ``config.toml`` in the platform's user config dir::

    [server]
    host = "127.0.0.1"
    port = 11435
    parallel = 4
    keep_alive = "5m"
    max_loaded_models = 2
    queue_size = 16
    api_key_env = "PCRT_API_KEY"
    max_body_bytes = 16777216     # a chat or text completion request's body (16 MiB)
    embeddings_max_body_bytes = 16777216
    dag_max_body_bytes = 8388608  # POST /v1/dags: the document, its inputs and library
    peer_max_body_bytes = 67108864  # subgraphs and runs a peer sends here
    max_embedding_inputs = 256    # texts one /v1/embeddings request may hold
    max_embedding_tokens = 65536  # and their tokens in all

    [limits.default]              # every agent not named below
    requests_per_minute = 600
    tokens_per_minute = 200000

    [limits.agents.crawler]       # X-PC-Agent-ID: crawler
    requests_per_minute = 30

    [peers]                       # issue 6: LAN peers and upstream servers
    lan = true                    # announce and browse by mDNS (pcrt serve --lan)
    interfaces = "all"            # or a list of addresses, e.g. ["192.168.1.20"]
    cluster_key_env = "PCRT_CLUSTER_KEY"
    migrate_on_drain = true       # on SIGTERM, move running DAG runs to a peer
    migrate_on_battery = true     # and once per discharge on battery below battery_threshold
    battery_threshold = 30        # percent

    [[peers.static]]              # a server mDNS cannot see
    name = "gpu-box"
    url = "http://10.0.0.5:8000"
    kind = "vllm"
    api_key_env = "GPU_BOX_KEY"
    models = ["qwen2.5-7b-instruct"]
    tags = ["complex"]

    [[tools.http]]                # issue 18: tools agents call (pcrt.runtime.tools.settings)
    name = "weather"
    url = "http://127.0.0.1:9000/weather"

    [[tools.mcp]]
    name = "files"
    command = ["python", "server.py"]

    [tools.permissions]
    default = ["*"]
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pcrt.routing.settings import PeerSettings
from pcrt.runtime.errors import ConfigError
from pcrt.runtime.tools.settings import ToolSettings

__all__ = [
    "AgentLimits",
    "LimitSettings",
    "ServerSettings",
    "is_loopback",
    "parse_duration",
]

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


_LONGEST = 100 * 365 * 86400.0  # a keep-alive past this is a mistake (or "for ever": -1)


def parse_duration(value: str | float | int) -> float:
    """Seconds from Ollama-style durations: 300, "300", "5m", "1h", "-1" (forever)."""
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite
            raise ValueError(f"not a duration: {value!r}")
        if abs(value) > _LONGEST:
            raise ValueError(f"{value!r} s is longer than a century: -1 keeps it for ever")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (examples: 30s, 5m, 1h, 0, -1)")
    seconds = float(match[1]) * _UNITS[match[2]]
    if not abs(seconds) <= _LONGEST:  # NaN and inf too: "9" * 400 is a float's inf
        shown = str(value) if len(str(value)) <= 24 else str(value)[:21] + "..."
        raise ValueError(f"{shown!r} is longer than a century: -1 keeps it for ever")
    return seconds


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AgentLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)


class LimitSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    default: AgentLimits = AgentLimits()
    agents: dict[str, AgentLimits] = {}

    def for_agent(self, agent: str) -> AgentLimits:
        return self.agents.get(agent, self.default)


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=11435, ge=0, le=65535)
    parallel: int = Field(default=4, ge=1, le=64)
    context: int | None = Field(default=None, ge=64)
    n_threads: int | None = Field(default=None, ge=1)
    keep_alive: float = 300.0  # seconds; 0 unloads after each request, < 0 keeps forever
    max_loaded_models: int = Field(default=2, ge=1)
    queue_size: int = Field(default=16, ge=0)  # waiting requests per model beyond its slots
    api_key: str | None = None
    api_key_env: str = "PCRT_API_KEY"
    # without an API key the daemon answers only requests whose Host is a loopback name
    # (localhost, 127.0.0.1, [::1]) or one of these: a web page that rebinds its own name
    # to 127.0.0.1 cannot read it through a visitor's browser. With a key, the key decides.
    allowed_hosts: tuple[str, ...] = ()
    shutdown_grace: float = Field(default=10.0, ge=0)
    resume_on_start: bool = False  # resume interrupted DAG runs when the daemon starts
    # deterministic DAG nodes and calls remembered by their inputs (least recently used
    # go first; 0 remembers none)
    dag_cache_entries: int = Field(default=10_000, ge=0)
    # Responses API responses stored (store: true) for previous_response_id and GET; the
    # oldest go first past it (cache/responses.py)
    responses_kept: int = Field(default=1000, ge=1)
    device_refresh: float = Field(default=5.0, gt=0)  # seconds between live device readings
    # KV state blobs (issue 5): the store's size bound (LRU eviction of finished runs'
    # states; None: unbounded) and the largest state PUT /v1/states accepts
    blob_max_bytes: int | None = Field(default=10 * 1024**3, ge=1)
    state_upload_max_bytes: int = Field(default=2 * 1024**3, ge=1)
    # the KV chunk store (issue 19): prompts' prefixes restored rather than computed, in
    # RAM and on disk under the home dir; 0 bytes turns a tier off, both off: no store.
    # RAM None: an eighth of the machine's memory, at most 2 GiB (an edge box's models
    # need the rest)
    kv_chunk_tokens: int = Field(default=64, ge=16, le=4096)
    kv_ram_bytes: int | None = Field(default=None, ge=0)
    kv_disk_bytes: int = Field(default=10 * 1024**3, ge=0)

    def kv_ram_for(self, memory_total: int) -> int:
        """The chunk store's RAM tier on a machine with ``memory_total`` bytes."""
        if self.kv_ram_bytes is not None:
            return self.kv_ram_bytes
        return min(2 * 1024**3, memory_total // 8)

    # request bodies, by route (issue 16): what the daemon reads before it refuses with a
    # 413; other routes take a few fields and are held to guard's SMALL_BODY_BYTES
    max_body_bytes: int = Field(default=16 * 1024**2, ge=1)  # chat and text completions
    embeddings_max_body_bytes: int = Field(default=16 * 1024**2, ge=1)
    dag_max_body_bytes: int = Field(default=8 * 1024**2, ge=1)  # POST /v1/dags
    # subgraphs and migrated runs: they carry every finished node's output
    peer_max_body_bytes: int = Field(default=64 * 1024**2, ge=1)
    # /v1/embeddings (issue 16): the most texts, and tokens in all, one request may embed;
    # more is a 400 before any work (OpenAI's own bounds are 2,048 texts, 300,000 tokens)
    max_embedding_inputs: int = Field(default=256, ge=1)
    max_embedding_tokens: int = Field(default=65_536, ge=1)
    limits: LimitSettings = LimitSettings()
    peers: PeerSettings = PeerSettings()
    tools: ToolSettings = ToolSettings()

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(self.api_key_env) or None

    def check_exposure(self) -> None:
        """Anything but loopback must have an API key: a LAN is not a trust boundary."""
        if not is_loopback(self.host) and not self.resolved_api_key():
            raise ConfigError(
                f"binding to {self.host} exposes the API beyond this machine: set an API key "
                f"(--api-key, env {self.api_key_env}, or api_key in the config file)"
            )

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> ServerSettings:
        path = config_file or Path(
            os.environ.get("PCRT_CONFIG")
            or Path(platformdirs.user_config_dir("pcrt")) / "config.toml"
        )
        values: dict[str, Any] = {}
        if path.exists():
            try:
                raw = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from None
            unknown = set(raw) - {"server", "limits", "peers", "tools"}
            if unknown:
                raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}")
            values.update(raw.get("server", {}))
            for section in ("limits", "peers", "tools"):
                if section in raw:
                    values[section] = raw[section]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: "
                f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors()
            )
            raise ConfigError(f"{path}: {problems}") from None
