"""The dashboard in a real browser (issue 21): headless chromium (``tests/browser.py``)
logs in with the API key, follows a DAG run on the real default model live as its nodes
start and finish, cancels and resumes one from its page, and draws every page without an
error in its console. A screenshot of each page is written to ``PCRT_TEST_ARTIFACTS``."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcrt.routing.settings import PeerSettings, StaticPeer
from pcrt.runtime.server.settings import ServerSettings
from tests.browser import Browser, browser_or_skip
from tests.live_server import LiveServer, ServerFactory
from tests.peering import wait_for

KEY = "dashboard-test-key"
# three generations in a chain: each waits for the one before
CHAIN = """
dag: /dynamic/ui_chain
inputs: {topic: {type: string}}
budget: {max_nodes: 8, max_tokens: 1000, timeout_sec: 120}
nodes:
  first:
    type: llm
    tag: simple
    prompt: "List the numbers from 1 to 300, separated by commas ({{ inputs.topic }}):"
    temperature: 0
    max_tokens: 64
  second:
    type: llm
    tag: simple
    prompt: "Go on from this: {{ nodes.first.output }}"
    temperature: 0
    max_tokens: 48
  third:
    type: llm
    tag: simple
    prompt: "Give this a title: {{ nodes.second.output }}"
    temperature: 0
    max_tokens: 16
"""
# one long generation (cancelled in its middle), then a short one
LONG = """
dag: /dynamic/ui_long
inputs: {start: {type: string}}
budget: {max_nodes: 8, max_tokens: 2000, timeout_sec: 180}
nodes:
  count:
    type: llm
    tag: simple
    prompt: "List the numbers from {{ inputs.start }} to 900, separated by commas:"
    temperature: 0
    max_tokens: 500
  after:
    type: llm
    tag: simple
    prompt: "Say done. {{ nodes.count.output | length }}"
    temperature: 0
    max_tokens: 4
"""
# what the run page shows, read in one call (the page redraws: elements do not last)
NODES = (
    "return [...document.querySelectorAll('g.node')].map(g => "
    "[g.dataset.node, g.dataset.status, g.querySelector('[data-facts]').textContent])"
)
RUN_STATUS = (
    "const badge = document.querySelector('[data-section=run-facts] .status');"
    "return badge ? badge.dataset.status : null"
)


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory, default_model_path: Path) -> LiveServer:
    # a peer that never answers: the peers page has one to draw (in cooldown); one slot,
    # so a test can hold a run back until its page follows it (``holding_the_model``)
    gone = StaticPeer(name="far-box", url="http://127.0.0.1:9", kind="openai", models=("big",))
    peers = PeerSettings(static=(gone,), health_interval=0.5)
    return module_live_server(ServerSettings(api_key=KEY, peers=peers, parallel=1))


@contextlib.contextmanager
def holding_the_model(server: LiveServer) -> Iterator[None]:
    """The model's one slot busy with a long streamed answer until the block ends (the
    client leaves, the slot is free): a run started inside waits at its first node, so
    its page can be following it before anything happens."""
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "List the numbers from 1 to 900:"}],
        "max_tokens": 3000,
        "stream": True,
    }
    with server.http(timeout=180) as http, http.stream("POST", "/v1/chat/completions", json=body):
        yield  # the headers came: it has its slot


@pytest.fixture(scope="module")
def browser(server: LiveServer) -> Iterator[Browser]:
    browser_or_skip()
    with Browser() as opened:
        _log_in(opened, server)
        yield opened


def _log_in(browser: Browser, server: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    browser.open(server.url + "/ui/")  # no cookie yet: sent to the login page
    assert browser.driver.current_url == server.url + "/ui/login"
    browser.shot("login")
    browser.driver.find_element(By.ID, "key").send_keys(KEY)
    browser.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    browser.wait(lambda: browser.js("return document.querySelector('nav') !== null"), 30, "nav")
    assert browser.driver.current_url.startswith(server.url + "/ui/")


def _start(server: LiveServer, dag: str, inputs: dict[str, Any], *, wait: bool = False) -> str:
    """The run's id, at once (or, ``wait``, once it finished)."""
    with server.http(timeout=180) as http:
        answer = http.post("/v1/dags", json={"dag": dag, "inputs": inputs, "wait": wait})
    assert answer.status_code == (200 if wait else 202), answer.text
    run_id: str = answer.json()["id"]
    return run_id


def _run(server: LiveServer, run_id: str) -> dict[str, Any]:
    with server.http() as http:
        view: dict[str, Any] = http.get(f"/v1/dags/{run_id}").json()
    return view


def _open_run(browser: Browser, server: LiveServer, run_id: str, first: str) -> None:
    """The run's page, following the run: its ``first`` node announced (and waiting for
    the held slot)."""
    browser.open(f"{server.url}/ui/#/runs/{run_id}")
    browser.driver.refresh()  # a new hash alone would keep the last run's page a moment
    drawn = f"return document.querySelector('svg[data-run=\"{run_id}\"]') !== null"
    browser.wait(lambda: browser.js(drawn), 30, "the run's graph")
    following = "return document.querySelector('[data-live]').textContent === 'live'"
    browser.wait(lambda: browser.js(following), 30, "the page following the run")
    browser.wait(lambda: _statuses(browser).get(first) == "running", 30, "the first node")
    browser.js("window.pcrtLoaded = true")  # gone if the page ever reloads


def _statuses(browser: Browser) -> dict[str, str]:
    return {node: status for node, status, _ in browser.js(NODES)}


def test_the_runs_page_follows_a_running_dag_live(server: LiveServer, browser: Browser) -> None:
    with holding_the_model(server):
        run_id = _start(server, CHAIN, {"topic": f"lighthouses {uuid.uuid4().hex[:8]}"})
        _open_run(browser, server, run_id, "first")
        # announced, waiting for the slot: running on the page, the next ones waiting
        assert _statuses(browser) == {"first": "running", "second": "pending", "third": "pending"}
    # the page as it changes, without reloading: each distinct picture once
    seen: list[list[list[str]]] = []

    def finished() -> bool:
        nodes = browser.js(NODES)
        if not seen or seen[-1] != nodes:
            seen.append(nodes)
        return all(status == "succeeded" for _, status, _ in nodes)

    browser.wait(finished, 120, "every node succeeded on the page")
    browser.shot("run")
    assert browser.js("return window.pcrtLoaded === true"), "the page reloaded"
    statuses = [{node: status for node, status, _ in picture} for picture in seen]
    # the page showed the chain as it ran: a node running while the next waited ...
    assert any(s["second"] == "running" and s["third"] == "pending" for s in statuses), seen
    # ... nodes finishing one after another, never out of order ...
    order = ["first", "second", "third"]
    for s in statuses:
        done = [s[n] == "succeeded" for n in order]
        assert done == sorted(done, reverse=True), s
    assert len({tuple(sorted(s.items())) for s in statuses}) >= 3, seen
    # ... and tokens counted as they streamed, before the node's record had them
    assert any("tokens so far" in facts for picture in seen for _, _, facts in picture), seen
    # what the page ends on is what the store says
    view = _run(server, run_id)
    assert view["status"] == "succeeded"
    final = {node: facts for node, _, facts in seen[-1]}
    for node in view["nodes"]:
        total = node["prompt_tokens"] + node["completion_tokens"]
        assert final[node["node_id"]].startswith(f"{total} tokens"), (final, node)
    browser.wait(lambda: browser.js(RUN_STATUS) == "succeeded", 30, "the run's status")
    assert browser.errors() == []


def test_a_run_is_cancelled_and_resumed_from_its_page(server: LiveServer, browser: Browser) -> None:
    from selenium.webdriver.common.by import By

    with holding_the_model(server):
        run_id = _start(server, LONG, {"start": str(uuid.uuid4().int % 50 + 1)})
        _open_run(browser, server, run_id, "count")

    def generating() -> bool:
        nodes = {node: facts for node, _, facts in browser.js(NODES)}
        return "tokens so far" in nodes["count"]

    browser.wait(generating, 60, "the long node generating")
    browser.driver.find_element(By.CSS_SELECTOR, "[data-action=cancel]").click()
    browser.wait(lambda: browser.js(RUN_STATUS) == "cancelled", 30, "the run cancelled")
    browser.shot("run-cancelled")
    assert _run(server, run_id)["status"] == "cancelled"
    statuses = {node: status for node, status, _ in browser.js(NODES)}
    assert statuses == {"count": "interrupted", "after": "pending"}, statuses
    cancel = browser.driver.find_element(By.CSS_SELECTOR, "[data-action=cancel]")
    assert not cancel.is_enabled()  # a cancelled run has nothing to stop
    resume = browser.driver.find_element(By.CSS_SELECTOR, "[data-action=resume]")
    assert resume.is_enabled()
    resume.click()
    browser.wait(lambda: browser.js(RUN_STATUS) == "succeeded", 120, "the resumed run done")
    assert browser.js("return window.pcrtLoaded === true"), "the page reloaded"
    assert _run(server, run_id)["status"] == "succeeded"
    assert {status for _, status, _ in browser.js(NODES)} == {"succeeded"}
    assert browser.errors() == []


def _visit(browser: Browser, server: LiveServer, page: str, ready: str) -> None:
    browser.open(f"{server.url}/ui/#/{page}")
    browser.driver.refresh()  # the hash alone does not load the page again
    browser.wait(lambda: browser.js(f"return document.querySelector({ready!r}) !== null"), 30, page)


def test_every_page_draws_the_daemons_state_without_errors(
    server: LiveServer, browser: Browser
) -> None:
    # something on each page: a loaded model, a finished run, usage rows
    with server.http() as http:
        answer = http.post(
            "/v1/chat/completions",
            headers={"X-PC-Agent-ID": "dashboard-agent"},
            json={
                "model": "smollm2-135m",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
        )
        assert answer.status_code == 200, answer.text
    run_id = _start(server, CHAIN, {"topic": "owls"}, wait=True)

    _visit(browser, server, "models", "tr[data-model='smollm2-135m'] button")
    browser.shot("models")
    _visit(browser, server, "runs", f"tr[data-run='{run_id}']")
    newest = "return document.querySelector('tr[data-run]').dataset.run"
    assert browser.js(newest) == run_id  # newest first
    browser.shot("runs")
    _visit(browser, server, "peers", "[data-chart=topology] g[data-peer='far-box']")
    assert browser.js("return document.querySelector('tr[data-peer=\"far-box\"]') !== null")
    browser.shot("peers")
    _visit(browser, server, "usage", "[data-chart=usage] rect[data-agent='dashboard-agent']")
    assert browser.js(
        "return document.querySelector('tr[data-agent=\"dashboard-agent\"]') !== null"
    )
    browser.shot("usage")
    _visit(browser, server, "cache", "[data-tier=RAM]")
    assert browser.js("return document.querySelector('[data-stat=hit-rate] .big').textContent")
    browser.shot("cache")
    assert browser.errors() == []


def test_the_dashboard_asks_a_browser_without_the_key_to_log_in(server: LiveServer) -> None:
    # no cookie, no key: a page is a redirect, a call a 401, the login form a 401 on a
    # wrong key with no cookie set
    page = httpx.get(server.url + "/ui/", timeout=30)
    assert page.status_code == 303 and page.headers["location"] == "/ui/login"
    assert httpx.get(server.url + "/v1/pcrt/ps", timeout=30).status_code == 401
    wrong = httpx.post(server.url + "/ui/login", data={"key": "not-it"}, timeout=30)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert "not this daemon's API key" in wrong.text


def test_a_watching_stream_ends_when_its_client_leaves_or_the_daemon_drains(
    live_server: ServerFactory, default_model_path: Path
) -> None:
    server = live_server(ServerSettings(api_key=KEY))
    run_id = _start(server, LONG, {"start": "3"})
    tasks = server.services.dags

    def until_a_token(lines: Iterator[str]) -> None:
        for line in lines:
            if line == "event: token":
                return
        raise AssertionError("the stream ended before a token")

    with server.http() as http:
        with http.stream("GET", f"/v1/dags/{run_id}/events") as events:
            until_a_token(events.iter_lines())
        # the tab closed: it is fed no more, while the run goes on
        wait_for(lambda: run_id not in tasks.listeners, 10, "the listener dropped")
        assert tasks.running(run_id)
        with http.stream("GET", f"/v1/dags/{run_id}/events") as events:
            lines = events.iter_lines()
            until_a_token(lines)
            drain = server.services.begin_drain
            assert drain is not None
            drain()  # what SIGTERM does
            rest = list(lines)  # ends now, not when the run does
        assert "data: [DONE]" in rest
        assert tasks.running(run_id)  # the run itself goes on
