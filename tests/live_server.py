"""A real pcrt daemon (uvicorn) on a free loopback port, in a thread, for tests and benches;
and ``ServerFactory``, what conftest's ``live_server`` fixtures hand a test."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

from pcrt.runtime.models.registry import Registry
from pcrt.runtime.server.app import create_app
from pcrt.runtime.server.services import Services
from pcrt.runtime.server.settings import ServerSettings
from tests.homes import isolated_paths

if TYPE_CHECKING:  # the benches import this module without the dev extra's SDK
    import openai

__all__ = ["LiveServer", "ServerFactory", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_process(port: int, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """``pcrt serve`` in a process of its own (one a test may SIGKILL), on ``port``, once
    it answers /health; ``args``: more of its flags."""
    pcrt = Path(sys.executable).with_name("pcrt")
    proc = subprocess.Popen(
        [str(pcrt), "serve", "--port", str(port), "--log-level", "warning", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("pcrt serve did not start")


class LiveServer:
    def __init__(
        self, settings: ServerSettings, registry: Registry | None = None, **app_options: Any
    ) -> None:
        """Without ``registry`` the app loads one from the environment at start-up: only
        right inside a test (after the per-test PCRT_HOME is set), never in a module or
        session fixture. ``app_options`` go to ``create_app`` (a synthetic battery)."""
        port = free_port()  # never the real daemon's port (the settings default)
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
        self.app = create_app(self.settings, registry=registry, **app_options)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.server.run, name="pcrt-test-server")

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self._thread.is_alive():
                raise RuntimeError("the test server died while starting")
            time.sleep(0.05)
        raise RuntimeError("the test server did not start within 30 s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def sdk(self) -> openai.OpenAI:
        """The official OpenAI client on this daemon, with its key; no retries, so a test
        sees every answer as it came."""
        import openai

        key = self.settings.api_key or "unused"
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def http(self, timeout: float = 60) -> httpx.Client:
        """An httpx client on this daemon, with its key (httpx's 5 s default flaked under
        load: a ReadTimeout mid-stream)."""
        key = self.settings.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def usage_rows(self, agent: str) -> list[dict[str, Any]]:
        """The daemon's usage rows for ``agent``, those still queued included."""
        return self.services.usage.rows(agent=agent)


class ServerFactory:
    """Starts daemons that stop when its scope ends (a test's, or a module's), last
    started first stopped."""

    def __init__(self, stack: contextlib.ExitStack, new_home: Callable[[str], Path]) -> None:
        self._stack = stack
        self._new_home = new_home

    def __call__(
        self,
        settings: ServerSettings | None = None,
        *,
        registry: Registry | None = None,
        models: str = "",
        **app_options: Any,
    ) -> LiveServer:
        """A started daemon. Without ``registry``, one over a home of its own (a fresh
        temporary dir) with ``models`` as its models.toml. ``app_options`` go to
        ``create_app``: ``opener`` (``tests.fakes.FakeEngines``), ``battery``, ``clock``."""
        if registry is None:
            registry = Registry.load(isolated_paths(self._new_home("daemon-home"), models))
        server = LiveServer(settings or ServerSettings(), registry=registry, **app_options)
        return self._stack.enter_context(server)
