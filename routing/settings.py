"""What the routing layer is configured with: the ``[peers]`` section of the daemon's
config file (see ``pcrt.runtime.server.settings`` for the whole file)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["PeerSettings", "StaticPeer"]


class StaticPeer(BaseModel):
    """A peer from config: a cloud endpoint or any server mDNS does not reach."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(pattern=r"^https?://")
    kind: Literal["pcrt", "vllm", "openai"] = "openai"
    api_key_env: str | None = None  # the env var holding its API key (the key never in config)
    models: tuple[str, ...] = ()  # its model names; empty: read from its /v1/models
    tags: tuple[str, ...] = ()  # tags every model of this peer answers to, e.g. "complex"
    strength: float | None = None  # larger is stronger (say, billions of parameters)


class PeerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    lan: bool = False  # announce and browse by mDNS
    interfaces: str | list[str] = "all"  # where mDNS runs when lan is on: "all" or addresses
    name: str | None = None  # this node's name for peers (default: the host name)
    cluster_key: str | None = None
    cluster_key_env: str = "PCRT_CLUSTER_KEY"
    health_interval: float = Field(default=1.0, gt=0)  # seconds between peer health checks
    health_timeout: float = Field(default=1.0, gt=0)
    connect_timeout: float = Field(default=2.0, gt=0)  # forwarding: connect and first byte
    battery_threshold: float = Field(default=30.0, ge=0, le=100)
    migrate_on_drain: bool = False  # on SIGTERM, move unfinished DAG runs to a peer
    # on battery below battery_threshold, move running DAG runs to a peer (once per
    # discharge), reading the battery every battery_interval seconds
    migrate_on_battery: bool = False
    battery_interval: float = Field(default=5.0, gt=0)
    static: tuple[StaticPeer, ...] = ()

    @field_validator("interfaces")
    @classmethod
    def _interfaces(cls, value: str | list[str]) -> str | list[str]:
        from pcrt.routing.discovery import interfaces_setting  # zeroconf: only when used

        interfaces_setting(value)  # ValueError names the bad entry
        return value

    def resolved_cluster_key(self) -> str | None:
        return self.cluster_key or os.environ.get(self.cluster_key_env) or None
