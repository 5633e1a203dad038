"""``pcrt serve``: the daemon, FastAPI under uvicorn (``pcrt.cli.daemon`` runs it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pcrt.runtime.errors import ConfigError

__all__ = ["serve"]


@click.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 11435).")
@click.option("--parallel", type=int, default=None, help="Slots per model (default 4).")
@click.option("--ctx", "context", type=int, default=None, help="Context per slot.")
@click.option("--threads", "n_threads", type=int, default=None, help="llama.cpp threads.")
@click.option("--api-key", default=None, help="Require this bearer key (needed off loopback).")
@click.option("--keep-alive", default=None, help="Keep idle models loaded this long (5m).")
@click.option("--max-loaded", "max_loaded_models", type=int, default=None)
@click.option("--queue-size", type=int, default=None, help="Waiting requests per model.")
@click.option(
    "--resume-on-start/--no-resume-on-start",
    "resume_on_start",
    default=None,
    help="Resume interrupted DAG runs when the daemon starts (the service does).",
)
@click.option("--lan", is_flag=True, default=None, help="Announce and find peers by mDNS.")
@click.option("--interfaces", default=None, help='mDNS interfaces: "all" or IPv4 addresses.')
@click.option("--name", "node_name", default=None, help="This node's name for its peers.")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None
)
@click.option("--log-level", "uvicorn_log", default="info", show_default=True)
def serve(
    config_file: Path | None,
    uvicorn_log: str,
    lan: bool | None,
    interfaces: str | None,
    node_name: str | None,
    **options: Any,
) -> None:
    """Run the daemon: an OpenAI-compatible API for every configured model.

    With --lan it announces itself and finds peers on the LAN; set the same cluster key
    (env PCRT_CLUSTER_KEY) on every machine that should trust the others.
    """
    from pydantic import ValidationError

    from pcrt.cli.daemon import run_daemon
    from pcrt.routing.settings import PeerSettings
    from pcrt.runtime.server.settings import ServerSettings

    settings = ServerSettings.load(config_file, **options)
    peer_flags = {
        "lan": lan,
        "name": node_name,
        "interfaces": interfaces.split(",") if interfaces and interfaces != "all" else interfaces,
    }
    changed = {k: v for k, v in peer_flags.items() if v is not None}
    if changed:
        try:  # validated, not copied: a bad --interfaces is a clear error, not a traceback
            peers = PeerSettings.model_validate({**settings.peers.model_dump(), **changed})
        except ValidationError as exc:
            raise ConfigError(f"--lan/--interfaces/--name: {exc.errors()[0]['msg']}") from None
        settings = settings.model_copy(update={"peers": peers})
    run_daemon(settings, uvicorn_log)
