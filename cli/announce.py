"""``pcrt announce``: make a non-pcrt OpenAI-compatible server (vLLM) a LAN peer."""

from __future__ import annotations

import click

from pcrt.runtime.errors import ConfigError

__all__ = ["announce"]


@click.command()
@click.option("--upstream", required=True, help="The server's base URL, e.g. http://10.0.0.5:8000")
@click.option("--name", default=None, help="Its peer name (default: from the URL's host).")
@click.option("--kind", type=click.Choice(["vllm", "openai"]), default="vllm", show_default=True)
@click.option(
    "--api-key-env", default=None, help="Env var with the upstream's key on each edge (never sent)."
)
@click.option("--tag", "tags", multiple=True, help="Tag its models answer to (e.g. complex).")
@click.option("--strength", type=float, default=None, help="Larger is stronger (e.g. 70).")
@click.option(
    "--interfaces",
    default="all",
    show_default=True,
    help='Where to announce: "all" or comma-separated IPv4 addresses.',
)
@click.option(
    "--cluster-key-env",
    default="PCRT_CLUSTER_KEY",
    show_default=True,
    help="Env var with the cluster key that signs the announcement.",
)
def announce(
    upstream: str,
    name: str | None,
    kind: str,
    api_key_env: str | None,
    tags: tuple[str, ...],
    strength: float | None,
    interfaces: str,
    cluster_key_env: str,
) -> None:
    """Announce UPSTREAM by mDNS until interrupted, with the models its /v1/models lists."""
    import asyncio
    import contextlib
    import os
    import signal
    from urllib.parse import urlsplit

    from pcrt.routing.announce import Upstream, announce_upstream
    from pcrt.routing.discovery import interfaces_setting

    host = urlsplit(upstream).hostname or "upstream"
    target = Upstream(
        url=upstream.rstrip("/"),
        name=name or host.replace(".", "-"),
        kind=kind,
        api_key_env=api_key_env,
        tags=tags,
        strength=strength,
    )
    try:
        chosen = interfaces_setting(interfaces)
    except ValueError as exc:
        raise ConfigError(f"--interfaces: {exc}") from None
    if chosen is None:
        raise ConfigError("--interfaces names no interface to announce on")
    key = os.environ.get(cluster_key_env)
    if not key:
        click.echo(
            f"warning: ${cluster_key_env} is not set: daemons will list this server as "
            "untrusted and never send it work",
            err=True,
        )

    def show(models: list[str]) -> None:
        click.echo(f"announcing {target.name} ({target.url}): {', '.join(models)}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await announce_upstream(
            target, interfaces=chosen, cluster_key=key, stop=stop, on_models=show
        )
        click.echo("goodbye sent")

    asyncio.run(main())
