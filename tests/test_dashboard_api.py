"""What the dashboard stands on, without a browser or a model (issue 21): its login and the
cookie that stands for the key (reads alone, or with the dashboard's header), its files
and their policy, a run's graph and its event stream, usage over time, and the pure
layering of a DAG. The browser's own tests are in ``tests/test_dashboard.py``."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from pcrt.cache.status import RESUMABLE_RUN_STATES, RunStatus
from pcrt.cache.store import Store
from pcrt.cache.usage import UsageLog, UsageRecord
from pcrt.cli.main import main
from pcrt.runtime.dag.graph import dag_graph, layers_of
from pcrt.runtime.server.settings import ServerSettings
from pcrt.runtime.server.ui_session import cookie_name, login_cookie, session_of
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory

KEY = "dashboard-api-key"
UI = Path(__file__).parents[1] / "runtime" / "server" / "ui"
CHECK_ONLY = """
dag: /dynamic/checks
nodes:
  first: {type: assert, that: "1 == 1"}
  second: {type: assert, that: "nodes.first.output", needs: [first]}
  third: {type: assert, that: "2 > 1", needs: [first, second]}
"""


@pytest.fixture(scope="module")
def server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(api_key=KEY), opener=FakeEngines())


@contextlib.contextmanager
def _logged_in(server: LiveServer) -> Iterator[httpx.Client]:
    """A client that logged in on the form, as a browser does (its cookie jar kept)."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/ui/login", data={"key": KEY})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
        cookie = answer.headers["set-cookie"]
        name = cookie_name(server.settings.port)
        assert cookie.startswith(f"{name}=") and KEY not in cookie
        assert "Path=/ui" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        yield client


def test_the_login_cookie_opens_the_pages_and_nothing_else(server: LiveServer) -> None:
    with _logged_in(server) as browser:
        page = browser.get("/ui/")
        assert page.status_code == 200 and '<script type="module" src="/ui/app.js">' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert browser.get("/ui/app.js").status_code == 200
        # browsers send a cookie to every port of the host: it must stand for no more
        # than the package's own files, never for the daemon's state
        for method, path in (("GET", "/v1/pcrt/ps"), ("POST", "/v1/pcrt/stop")):
            sent = browser.request(method, path, json={"model": "smollm2-135m"})
            assert sent.status_code == 401, (method, path)
        bearer = {"Authorization": f"Bearer {KEY}"}
        stop = browser.post("/v1/pcrt/stop", json={"model": "smollm2-135m"}, headers=bearer)
        assert stop.status_code == 200, stop.text
        out = browser.post("/ui/logout", headers=bearer)
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    # a cookie made for another key opens nothing
    forged = login_cookie(cookie_name(server.settings.port), "another-key", secure=False)
    forged_jar = {"Cookie": forged.split(";")[0]}
    assert httpx.get(server.url + "/ui/", headers=forged_jar, timeout=30).status_code == 303
    login = httpx.get(server.url + "/ui/login", timeout=30)
    assert login.status_code == 200 and 'name="key"' in login.text
    for own in ("/ui/app.css", "/ui/login.js"):  # the login page's own, without the key
        assert httpx.get(server.url + own, timeout=30).status_code == 200, own
    script = httpx.get(server.url + "/ui/app.js", timeout=30)
    assert script.status_code == 303  # the rest of the dashboard is behind the key
    many = "&".join(f"f{i}=1" for i in range(20))
    crowded = httpx.post(server.url + "/ui/login", content=many, timeout=30)
    assert crowded.status_code == 400  # a clear refusal, not a 500


def test_only_the_dashboards_own_files_are_served(server: LiveServer) -> None:
    with _logged_in(server) as browser:
        script = browser.get("/ui/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        for name in ("__init__.py", "nope.js", ".hidden", "..%2Fguard.py", "%2E%2E"):
            assert browser.get(f"/ui/{name}").status_code == 404, name
        # the client resolves it to /guard.py: outside the pages, the cookie opens nothing
        assert browser.get("/ui/../guard.py").status_code == 401


def test_without_a_key_the_dashboard_is_open(live_server: ServerFactory) -> None:
    open_server = live_server(ServerSettings(), opener=FakeEngines())
    assert httpx.get(open_server.url + "/ui/", timeout=30).status_code == 200
    login = httpx.get(open_server.url + "/ui/login", timeout=30)
    assert login.status_code == 303 and login.headers["location"] == "/ui/"
    root = httpx.get(open_server.url + "/ui", timeout=30)
    assert root.status_code == 308 and root.headers["location"] == "/ui/"


def test_a_runs_graph_and_the_events_of_a_run_that_is_not_running(server: LiveServer) -> None:
    with server.http() as http:
        run = http.post("/v1/dags", json={"dag": CHECK_ONLY}).json()
        assert run["status"] == "succeeded", run
        graph = http.get(f"/v1/dags/{run['id']}/graph").json()
        # a finished run's stream ends at once: the page has read it all already
        events = http.get(f"/v1/dags/{run['id']}/events")
        missing = http.get("/v1/dags/no-such-run/graph")
        missing_events = http.get("/v1/dags/no-such-run/events")
    assert {n["id"]: n["layer"] for n in graph["nodes"]} == {"first": 0, "second": 1, "third": 2}
    assert sorted(map(tuple, graph["edges"])) == [
        ("first", "second"),
        ("first", "third"),
        ("second", "third"),
    ]
    assert {n["type"] for n in graph["nodes"]} == {"assert"}
    assert events.status_code == 200 and events.text == "data: [DONE]\n\n"
    assert missing.status_code == 404 and missing_events.status_code == 404


def test_layers_put_each_node_right_of_what_it_waits_for() -> None:
    deps = {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": set(), "e": {"d", "c"}}
    assert layers_of(deps) == {"a": 0, "b": 1, "c": 2, "d": 0, "e": 3}
    # a cycle is drawn, not refused (and not followed for ever)
    looped = layers_of({"x": {"y"}, "y": {"x"}, "z": {"x"}})
    assert set(looped) == {"x", "y", "z"} and looped["z"] > looped["x"]
    # a long chain is no recursion
    chain = {str(i): ({str(i - 1)} if i else set()) for i in range(5000)}
    assert layers_of(chain)["4999"] == 4999
    # a malformed node is drawn with its edges; a document that does not parse, not at all
    bad = {"type": "llm", "prompt": "{{ nodes.ok.output }}", "max_tokens": "many"}
    ok = {"type": "assert", "that": "1"}
    partial = dag_graph({"dag": "/dynamic/x", "nodes": {"ok": ok, "bad": bad}})
    assert [(n["id"], n["layer"]) for n in partial["nodes"]] == [("ok", 0), ("bad", 1)]
    assert partial["edges"] == [["ok", "bad"]]
    broken = dag_graph({"dag": "nowhere", "nodes": {"bad": 3}})
    assert broken["nodes"] == [] and "invalid DAG" in broken["problem"]


def test_usage_over_time_in_buckets_per_agent(server: LiveServer) -> None:
    now = datetime.datetime.now(datetime.UTC)
    usage = server.services.usage
    for minutes_ago, agent, tokens in ((5, "a1", 10), (5, "a1", 5), (5, "a2", 7), (200, "a1", 1)):
        ts = (now - datetime.timedelta(minutes=minutes_ago)).isoformat(timespec="microseconds")
        usage.record(UsageRecord(agent, "m", "/v1/x", 200, 3, 0, tokens, ts=ts))
    with server.http() as http:
        hour = http.get("/v1/pcrt/usage", params={"window_s": 3600}).json()
        day = http.get("/v1/pcrt/usage", params={"window_s": 86400, "agent": "a1"}).json()
        bad = http.get("/v1/pcrt/usage", params={"window_s": 5})
        too_fine = http.get("/v1/pcrt/usage", params={"window_s": 86400, "bucket_s": 1})
    assert hour["bucket_s"] == 60  # 60 bars in an hour
    mine = [row for row in hour["series"] if row["agent"] in ("a1", "a2")]
    assert {(r["agent"], r["requests"], r["completion_tokens"]) for r in mine} == {
        ("a1", 2, 15),
        ("a2", 1, 7),
    }
    assert all(r["start"] % 60 == 0 for r in mine)
    assert {r["agent"] for r in day["series"]} == {"a1"} and day["bucket_s"] == 1800
    assert sum(r["requests"] for r in day["series"]) == 3
    assert {(t["agent"], t["requests"]) for t in day["totals"]} == {("a1", 3)}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window_s"
    assert too_fine.status_code == 400 and too_fine.json()["error"]["param"] == "bucket_s"


def test_the_pages_resume_button_follows_the_stores_resumable_states() -> None:
    script = (UI / "app.js").read_text(encoding="utf-8")
    listed = re.search(r"const RESUMABLE = new Set\(\[([^\]]*)\]\)", script)
    assert listed is not None
    names = set(re.findall(r'"(\w+)"', listed[1]))
    assert names == {str(s) for s in RESUMABLE_RUN_STATES} - {RunStatus.RUNNING}


def test_a_cookie_header_is_read_as_browsers_write_it() -> None:
    name = cookie_name(11435)
    assert session_of(f"a=1; {name}=abc; b=2".encode(), name) == "abc"
    # other apps on this host set odd cookies beside it: they do not hide it
    for odd in ('x={"a":1}', "a=b c", 'a="x'):
        assert session_of(f"{odd}; {name}=abc".encode(), name) == "abc", odd
    assert session_of(b"pcrt_ui_8080=abc", name) is None  # another daemon's
    assert session_of(None, name) is None


def test_pcrt_ui_says_where_the_dashboard_is(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PCRT_URL", server.url)
    shown = CliRunner().invoke(main, ["ui", "--no-open"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == f"{server.url}/ui/\n"
    assert "asks for the daemon's API key" in shown.stderr
    monkeypatch.setenv("PCRT_URL", "http://127.0.0.1:9")
    down = CliRunner().invoke(main, ["ui", "--no-open"])
    assert down.exit_code == 1 and "no pcrt daemon answers at http://127.0.0.1:9" in down.output


def test_the_charts_totals_are_pcrt_usages_totals(store: Store) -> None:
    """One scan gives the chart's buckets and the totals: the same totals as
    ``UsageLog.summary`` (errors, peers, fallbacks, missing counts, average TTFT)."""
    log = UsageLog(store)
    now = datetime.datetime.now(datetime.UTC)
    shapes: list[dict[str, Any]] = [
        dict(status=200, prompt_tokens=10, cached_tokens=2, completion_tokens=5, ttft_ms=30.0),
        dict(status=500, prompt_tokens=0, completion_tokens=0, ttft_ms=None, ran_on="peer-a"),
        dict(status=200, prompt_tokens=7, completion_tokens=9, ttft_ms=12.5, fallbacks="[]"),
    ]
    for i in range(60):
        ts = (now - datetime.timedelta(minutes=7 * i)).isoformat(timespec="microseconds")
        shape = shapes[i % 3]
        model = "m1" if i % 2 else "m2"
        log.record(UsageRecord(f"a{i % 4}", model, "/v1/x", ts=ts, **shape))
    since = (now - datetime.timedelta(hours=6)).isoformat(timespec="microseconds")
    series, totals = log.over_time(since=since, bucket_seconds=1800)
    expected = log.summary(since=since)
    assert [{k: t[k] for k in sorted(t)} for t in totals] == [
        {k: e[k] for k in sorted(e)} for e in expected
    ]
    assert sum(r["requests"] for r in series) == sum(e["requests"] for e in expected)
    assert all(r["start"] % 1800 == 0 for r in series)
    log.close()


def test_the_pages_write_durations_and_sizes_as_people_do(tmp_path: Path) -> None:
    """dom.js's formatters, run by Node where it is installed (the browser tests see
    them only through what a page happens to show)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node here to run the page's modules")
    script = tmp_path / "formats.mjs"
    script.write_text(
        "globalThis.document = {};\n"
        f"const dom = await import({json.dumps((UI / 'dom.js').as_uri())});\n"
        "const cases = [5.123, 59.96, 299.6, 3599.7, 7199];\n"
        "console.log(JSON.stringify({seconds: cases.map(dom.seconds),"
        " bytes: [0, 1536, 98 * 1024 * 1024].map(dom.bytes), count: dom.count(1234567)}));\n",
        encoding="utf-8",
    )
    shown = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "seconds": ["5.12 s", "1 min 0 s", "5 min 0 s", "1 h 0 min", "2 h 0 min"],
        "bytes": ["0 B", "1.5 KiB", "98.0 MiB"],
        "count": "1,234,567",
    }
