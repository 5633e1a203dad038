"""The ``[peers]`` section of the daemon's config (``routing/settings.py``, read through
``ServerSettings.load``) and where the cluster key comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.errors import ConfigError
from pcrt.runtime.server.settings import ServerSettings

PEERS_TOML = """
[server]
port = 12001

[peers]
lan = true
interfaces = ["192.168.1.20", "10.0.0.2"]
cluster_key_env = "ROUTING_UNITS_CLUSTER"

[[peers.static]]
name = "gpu-box"
url = "http://10.0.0.5:8000"
kind = "vllm"
api_key_env = "GPU_BOX_KEY"
models = ["qwen2.5-7b-instruct"]
tags = ["complex"]
strength = 7

[[peers.static]]
name = "cloud"
url = "https://api.example.com/v1"
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_parses_peers_and_static_peers(tmp_path: Path) -> None:
    settings = ServerSettings.load(_config(tmp_path, PEERS_TOML))
    assert settings.port == 12001
    peers = settings.peers
    assert isinstance(peers, PeerSettings)
    assert peers.lan is True
    assert peers.interfaces == ["192.168.1.20", "10.0.0.2"]
    assert peers.cluster_key_env == "ROUTING_UNITS_CLUSTER"
    assert peers.static == (
        StaticPeer(
            name="gpu-box",
            url="http://10.0.0.5:8000",
            kind="vllm",
            api_key_env="GPU_BOX_KEY",
            models=("qwen2.5-7b-instruct",),
            tags=("complex",),
            strength=7.0,
        ),
        StaticPeer(name="cloud", url="https://api.example.com/v1"),
    )
    assert peers.static[1].kind == "openai"  # the default for a static peer


def test_load_without_peers_section_has_defaults(tmp_path: Path) -> None:
    peers = ServerSettings.load(_config(tmp_path, "[server]\nport = 12002\n")).peers
    assert (peers.lan, peers.interfaces, peers.static) == (False, "all", ())


def test_unknown_key_in_peers_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = _config(tmp_path, "[peers]\nlan = true\nclustr_key_env = 'X'\n")
    with pytest.raises(ConfigError) as caught:
        ServerSettings.load(path)
    message = str(caught.value)
    assert "peers.clustr_key_env" in message and "unknown key" in message
    assert str(path) in message


def test_static_peer_with_a_bad_url_is_a_config_error_naming_it(tmp_path: Path) -> None:
    text = "[[peers.static]]\nname = 'ftp-box'\nurl = 'ftp://x'\n"
    with pytest.raises(ConfigError) as caught:
        ServerSettings.load(_config(tmp_path, text))
    assert "peers.static.0.url" in str(caught.value)


def test_unknown_key_in_a_static_peer_is_a_config_error(tmp_path: Path) -> None:
    text = "[[peers.static]]\nname = 'a'\nurl = 'http://a:1'\napi_key = 'sk-in-config'\n"
    with pytest.raises(ConfigError) as caught:
        ServerSettings.load(_config(tmp_path, text))
    assert "peers.static.0.api_key: unknown key" in str(caught.value)


def test_resolved_cluster_key_reads_the_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    peers = PeerSettings(cluster_key_env="ROUTING_UNITS_CLUSTER")
    monkeypatch.delenv("ROUTING_UNITS_CLUSTER", raising=False)
    assert peers.resolved_cluster_key() is None
    monkeypatch.setenv("ROUTING_UNITS_CLUSTER", "")
    assert peers.resolved_cluster_key() is None  # empty means unset
    monkeypatch.setenv("ROUTING_UNITS_CLUSTER", "s3cret")
    assert peers.resolved_cluster_key() == "s3cret"
    # a key in the config wins over the environment
    explicit = PeerSettings(cluster_key="from-config", cluster_key_env="ROUTING_UNITS_CLUSTER")
    assert explicit.resolved_cluster_key() == "from-config"


def test_resolved_cluster_key_from_a_loaded_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTING_UNITS_CLUSTER", "loaded-key")
    settings = ServerSettings.load(_config(tmp_path, PEERS_TOML))
    assert settings.peers.resolved_cluster_key() == "loaded-key"
