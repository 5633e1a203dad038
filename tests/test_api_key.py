"""Who may call the daemon (issue 16, items 6 and what held): every route but ``/health``
needs the API key when one is set, the OpenAPI schema and its pages included; the key is
compared in constant time; and the daemon will not listen beyond loopback without one.

On the fake engine (``tests/fakes.py``): the key is checked before any model matters.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Route

from pcrt.runtime.errors import ConfigError
from pcrt.runtime.server.app import create_app
from pcrt.runtime.server.guard import OPEN_PATHS, key_matches
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.server.ui_session import KEYLESS_PATHS
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory

KEY = "api-key-test-key"
REFUSED = "missing or wrong API key"


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(api_key=KEY), opener=FakeEngines())


def _routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute | Route]:
    """Every route, those of included routers too (FastAPI keeps an included router as
    one entry that holds the original, ours are included without a prefix)."""
    for route in routes:
        if isinstance(route, APIRoute | Route):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)


def _calls(server: LiveServer) -> list[tuple[str, str]]:
    """(method, path) for every route the app serves, path parameters filled in."""
    calls = []
    for route in _routes(server.app.routes):
        path = re.sub(r"\{[^}]+\}", "no-such-thing", route.path)
        for method in sorted((route.methods or set()) - {"HEAD", "OPTIONS"}):
            calls.append((method, path))
    return calls


def _call(server: LiveServer, method: str, path: str, **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"content": b"{}"} if method in ("POST", "PUT") else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **body)


def _message(response: httpx.Response) -> str:
    """An error's message in any of the daemon's API shapes (OpenAI's and Anthropic's
    nest it, Ollama's is the string itself)."""
    error = response.json()["error"]
    return str(error if isinstance(error, str) else error["message"])


def _refused_for_the_key(response: httpx.Response) -> bool:
    return response.status_code == 401 and REFUSED in _message(response)


def test_every_route_but_health_needs_the_key(server: LiveServer) -> None:
    calls = _calls(server)
    paths = {path for _, path in calls}
    # the walk sees the schema and its pages and the peers' routes, not only the API's
    assert {"/openapi.json", "/docs", "/redoc", "/v1/pcrt/subgraphs"} <= paths
    for method, path in calls:
        without = _call(server, method, path)
        wrong = _call(server, method, path, authorization="Bearer not-the-key")
        with_key = _call(server, method, path, authorization=f"Bearer {KEY}")
        if path in OPEN_PATHS:
            assert without.status_code == 200, (method, path, without.text)
            continue
        if path in KEYLESS_PATHS:  # the dashboard's login page and its stylesheet
            assert without.status_code < 500 and REFUSED not in without.text, path
            continue
        if method == "GET" and (path == "/ui" or path.startswith("/ui/")):
            # a person's browser: sent to the login page, the same for a wrong key
            for refused in (without, wrong):
                assert refused.status_code == 303, (path, refused.status_code)
                assert refused.headers["location"] == "/ui/login"
            assert with_key.status_code in (200, 308, 404), (path, with_key.status_code)
            continue
        assert _refused_for_the_key(without), (method, path, without.status_code, without.text)
        error = without.json()["error"]
        if path.startswith("/v1/messages"):  # Anthropic's shape: its type says why
            assert error["type"] == "authentication_error", (method, path, error)
        elif not path.startswith("/api/") and path != "/":  # Ollama's is the message alone
            assert error["code"] == "invalid_api_key"
        assert _refused_for_the_key(wrong), (method, path, wrong.status_code, wrong.text)
        # with the key, the route itself answers (a peer's route asks for a signature)
        assert not _refused_for_the_key(with_key), (method, path, with_key.text)
        assert with_key.status_code < 500, (method, path, with_key.text)
    assert {"/health"} == OPEN_PATHS


def test_a_path_no_route_serves_needs_the_key_too(server: LiveServer) -> None:
    """Without the key, nobody learns which paths exist."""
    assert _refused_for_the_key(_call(server, "GET", "/v1/no-such-route"))
    assert _call(server, "GET", "/v1/no-such-route", authorization=f"Bearer {KEY}").status_code == (
        404
    )


def test_the_schema_without_a_key_set_stays_open_on_loopback(live_server: ServerFactory) -> None:
    """No key set (loopback only): the schema and its pages answer, as every route does."""
    open_server = live_server(ServerSettings(), opener=FakeEngines())
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(open_server.url + path, timeout=30).status_code == 200, path


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert key_matches(f"Bearer {KEY}".encode(), KEY)
    assert key_matches(f"bearer  {KEY} ".encode(), KEY)
    assert not key_matches(b"Bearer wrong", KEY)
    assert not key_matches(f"Basic {KEY}".encode(), KEY)  # the key under another scheme
    assert not key_matches(None, KEY)
    assert not key_matches("Bearer ключ".encode(), KEY)  # bytes that are no ASCII: refused
    assert key_matches("Bearer ключ".encode(), "ключ")
    # every check went through hmac.compare_digest, whatever the scheme or the header
    assert len(compared) == 7
    assert compared[0] == (KEY.encode(), KEY.encode())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_the_daemon_will_not_listen_beyond_loopback_without_a_key(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="API key"):
        create_app(ServerSettings(host=host))
    create_app(ServerSettings(host=host, api_key=KEY))  # with a key it may
    monkeypatch.setenv("PCRT_API_KEY", KEY)
    create_app(ServerSettings(host=host))  # the key from the environment counts too


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_key(host: str) -> None:
    create_app(ServerSettings(host=host))


def test_without_a_key_only_loopback_names_are_answered(live_server: ServerFactory) -> None:
    """DNS rebinding: a web page whose own name resolves to 127.0.0.1 could read a keyless
    daemon through its visitor's browser; the browser still sends the page's name as
    Host, so a keyless daemon answers loopback names (and allowed_hosts) only."""
    keyless = live_server(ServerSettings(allowed_hosts=("pcrt.lan",)), opener=FakeEngines())
    port = keyless.settings.port

    def asked_as(host: str, path: str = "/v1/models") -> httpx.Response:
        return httpx.get(keyless.url + path, headers={"Host": host}, timeout=30)

    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.5.5.5"):
        assert asked_as(host).status_code == 200, host
    for host in ("pcrt.lan", f"PCRT.LAN:{port}", "dash.localhost", "localhost."):
        assert asked_as(host).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
        refused = asked_as(host)
        assert refused.status_code == 403, host
        assert refused.json()["error"]["code"] == "host_not_allowed"
        assert "allowed_hosts" in refused.json()["error"]["message"]
    assert asked_as("evil.example", "/api/tags").json()["error"].startswith("this daemon")
    assert asked_as("evil.example", "/ui/").status_code == 403  # the dashboard too
    # with a key the key decides, whatever the name (a LAN daemon is asked by its own)
    keyed = live_server(ServerSettings(api_key=KEY), opener=FakeEngines())
    named = {"Host": "gpu-box.lan", "Authorization": f"Bearer {KEY}"}
    assert httpx.get(keyed.url + "/v1/models", headers=named, timeout=30).status_code == 200


def test_without_a_key_no_other_sites_page_is_answered(live_server: ServerFactory) -> None:
    """Any web page can make a browser post to 127.0.0.1 (a form, a fetch in no-cors
    mode): it cannot read the answer, but the work would run. The browser says whose page
    asks (Origin); a keyless daemon answers its own pages and clients that send none."""
    keyless = live_server(ServerSettings(allowed_hosts=("pcrt.lan",)), opener=FakeEngines())
    port = keyless.settings.port

    def posted_from(origin: str | None) -> httpx.Response:
        headers = {"Origin": origin} if origin is not None else {}
        body = {"model": "nope", "messages": []}
        return httpx.post(keyless.url + "/v1/chat/completions", json=body, headers=headers)

    for origin in (
        None,
        f"http://127.0.0.1:{port}",
        f"http://localhost:{port}",
        "https://pcrt.lan",
    ):
        assert posted_from(origin).status_code != 403, origin  # the route's own answer
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example", "file://"):
        refused = posted_from(origin)
        assert refused.status_code == 403, origin
        assert "no web page but its own" in refused.json()["error"]["message"]
