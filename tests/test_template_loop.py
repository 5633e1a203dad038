"""Templates never hold up the daemon's event loop.

A template that is not plain runs in the template worker, up to its 2 s deadline; the
executor used to wait for it with a blocking call on the loop, so ten slow asserts in one
DAG stalled every request for 7-9 s. Now the loop awaits the worker's own thread, which
serves one request at a time in arrival order."""

from __future__ import annotations

import asyncio
import time

import httpx

from pcrt.runtime.dag import make_environment, make_scope, render
from pcrt.runtime.dag.template_render import check_assert_async, render_async
from pcrt.runtime.errors import AssertFailed
from pcrt.runtime.server.settings import ServerSettings
from tests.health_probe import HealthProbe, loop_gaps
from tests.live_server import ServerFactory


def _slow(thousands: int) -> str:
    """A template (never plain: a loop) that steps ``thousands`` x 1,000 times."""
    return (
        f"{{% for i in range({thousands}) %}}{{% for j in range(1000) %}}{{% endfor %}}"
        "{% endfor %}{{ inputs.n }}"
    )


def test_ten_slow_asserts_in_one_dag_leave_health_fast(live_server: ServerFactory) -> None:
    """The probe's payload: ten ``('a\\n' * 50000) | indent(99999)`` asserts, each one
    filling the worker's memory (5 GB asked) for most of a second."""
    server = live_server(ServerSettings())
    that = "(('a\\n' * 50000) | indent(99999)) | length > 0"
    doc = {
        "dag": "/dynamic/indents",
        "nodes": {f"a{i}": {"type": "assert", "that": that} for i in range(10)},
    }
    with HealthProbe(server.url) as probe:
        r = httpx.post(server.url + "/v1/dags", json={"dag": doc}, timeout=120)
    print(probe.report("ten indent asserts"))
    assert probe.failures == []
    assert probe.worst < 1.0, probe.report("ten indent asserts")
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["status"] == "failed"
    assert "SecurityError" in run["error"], run["error"]


async def test_slow_templates_run_side_by_side_with_the_loop_free() -> None:
    """Six nodes render at once: each gets its own answer, in turn in the worker, and
    the loop ticks on meanwhile."""
    env = make_environment()
    source = _slow(150)
    started = time.perf_counter()
    async with loop_gaps() as gaps:
        texts = await asyncio.gather(
            *(render_async(env, source, make_scope({"n": i}, {})) for i in range(6))
        )
        failed = None
        try:
            await check_assert_async(env, "inputs.n * 2 > 5", make_scope({"n": 2}, {}), node="c")
        except AssertFailed as exc:
            failed = exc
    elapsed = time.perf_counter() - started
    assert texts == [str(i) for i in range(6)]
    assert failed is not None and failed.node == "c" and failed.values == {"inputs.n": "2"}
    print(f"6 slow renders in {elapsed:.2f} s; loop gaps: worst {max(gaps) * 1e3:.1f} ms")
    assert max(gaps) < 0.25
    assert env.worker is not None
    env.worker.close()


async def test_a_cancelled_render_lets_go_at_once_and_the_worker_serves_on() -> None:
    """A run's timeout or a shutdown cancels its nodes: a render the worker is on is
    abandoned (its child killed), one still queued is dropped, and the next render
    starts a new child."""
    env = make_environment()
    forever = _slow(900)  # most of its 1 s meter
    scope = make_scope({"n": 1}, {})
    tasks = [asyncio.create_task(render_async(env, forever, scope)) for _ in range(3)]
    await asyncio.sleep(0.3)  # the first one is in the worker
    started = time.perf_counter()
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert time.perf_counter() - started < 0.5
    assert await render_async(env, _slow(1), scope) == "1"
    assert render(env, "{% for i in range(2) %}{{ i }}{% endfor %}", scope) == "01"
    assert env.worker is not None
    env.worker.close()
