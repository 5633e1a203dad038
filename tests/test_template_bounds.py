"""Templates that multiply what they read never build it in the daemon's process.

A plain template renders in the daemon (no round trip to the template worker); plain
now means its AST proves a bound on what it builds, linear in the sizes of the values it
reads, and those sizes fit a budget at render time (``template_bounds``). Everything else
runs in the worker, under its memory limit and deadline. The filters the sandbox wraps to
bound their widths keep working with the arguments they take."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pcrt.runtime.dag import evaluate, make_environment, make_scope, render
from pcrt.runtime.dag.template_bounds import PLAIN_BUDGET
from pcrt.runtime.dag.templates import DagSandbox, sandbox_here
from pcrt.runtime.errors import RenderFailed
from pcrt.runtime.server.settings import ServerSettings
from tests.health_probe import HealthProbe
from tests.live_server import ServerFactory

MB = 2**20


@pytest.fixture(scope="module")
def env() -> Iterator[DagSandbox]:
    sandbox = make_environment()
    yield sandbox
    assert sandbox.worker is not None
    sandbox.worker.close()


def test_a_join_bomb_assert_fails_cleanly_and_the_daemon_stays_small(
    live_server: ServerFactory,
) -> None:
    """The probe's 260 KB request: 40,000 empty strings joined by a 100,000-character
    separator is 4 GB. It rendered in the daemon (+3.8 GB, /health stalled 11.5 s); now
    the worker runs it, runs out of its memory, and the assert fails saying so."""
    server = live_server(ServerSettings())
    doc = {
        "dag": "/dynamic/join-bomb",
        "inputs": {"l": {"type": "array"}, "s": {"type": "string"}},
        "nodes": {"bomb": {"type": "assert", "that": "(inputs.l | join(inputs.s)) | length > 0"}},
    }
    body = {"dag": doc, "inputs": {"l": [""] * 40_000, "s": "x" * 100_000}}
    assert 250_000 < len(json.dumps(body)) < 300_000
    with HealthProbe(server.url) as probe:
        r = httpx.post(server.url + "/v1/dags", json=body, timeout=120)
    print(probe.report("join bomb"))
    assert probe.failures == []
    assert probe.rss_growth < 100 * MB, probe.report("join bomb")
    assert probe.worst < 1.0, probe.report("join bomb")
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["status"] == "failed"
    assert "SecurityError: the template needs more memory" in run["error"], run["error"]


def test_validating_a_dag_runs_none_of_its_templates(live_server: ServerFactory) -> None:
    """Jinja folds constant output when it compiles, and validation compiles every
    template in the daemon: a 6 KB literal indented 99,999 columns built 300 MB there
    before the run began. Now nothing runs until the template renders, in the worker."""
    server = live_server(ServerSettings())
    that = "'" + "a\n" * 3000 + "' | indent(99999) | length > 0"
    doc = {"dag": "/dynamic/folded", "nodes": {"fold": {"type": "assert", "that": that}}}
    with HealthProbe(server.url) as probe:
        r = httpx.post(server.url + "/v1/dags", json={"dag": doc}, timeout=120)
    print(probe.report("constant folding"))
    assert probe.rss_growth < 100 * MB, probe.report("constant folding")
    assert probe.worst < 1.0, probe.report("constant folding")
    assert r.status_code == 200
    run = r.json()  # the worker builds it (or runs out of its 2 s on a busy machine)
    assert run["status"] == "succeeded" or "SecurityError: the template took" in run["error"]


# each one is under 1 MB of input and builds 100 MB to GBs; those marked plain rendered
# in the daemon's process before (the rest went to the worker already)
_BOMBS: list[tuple[str, str, bool, dict[str, Any]]] = [
    # (name, template, is an expression, inputs)
    ("join", "inputs.l | join(inputs.s) | length", True, {"l": [""] * 4000, "s": "x" * 10**5}),
    ("~", "(" + " ~ ".join(["inputs.s"] * 1000) + ") | length", True, {"s": "x" * 200_000}),
    ("output", "{{ inputs.s }}" * 1000, False, {"s": "x" * 200_000}),
    ("list", "inputs.s" + " | list | string" * 7 + " | length", True, {"s": "x" * 2000}),
    ("tojson", "inputs.s" + " | tojson" * 8 + " | length", True, {"s": '"' * 500_000}),
    (
        "replace",
        "inputs.s | replace('', inputs.t) | length",
        True,
        {"s": "x" * 10**4, "t": "y" * 10**5},
    ),
    ("indent", "('a\\n' * 50000) | indent(99999) | length", True, {}),
    (
        "format",
        "inputs.f | format(a=inputs.s) | length",
        True,
        {"f": "%(a)s" * 20000, "s": "x" * 50000},
    ),
    ("%", "(inputs.f % {'a': inputs.s}) | length", True, {"f": "%(a)s" * 20000, "s": "x" * 50000}),
    ("*", "([inputs.s] * 100000) | join | length", True, {"s": "x" * 10**4}),
    (
        "wordwrap",
        "inputs.s | wordwrap(1, true, inputs.t) | length",
        True,
        {"s": "x" * 2000, "t": "y" * 10**5},
    ),
]


@pytest.mark.parametrize(
    ("name", "source", "expression", "inputs"), _BOMBS, ids=[b[0] for b in _BOMBS]
)
def test_every_multiplying_template_stays_out_of_the_daemons_memory(
    env: DagSandbox, name: str, source: str, expression: bool, inputs: dict[str, Any]
) -> None:
    """Whatever the worker makes of it (an answer, or a refusal), this process allocates
    less than 100 MB for it."""
    scope = make_scope(inputs, {})
    tracemalloc.start()
    try:
        try:
            if expression:
                evaluate(env, source, scope)
            else:
                render(env, source, scope)
        except RenderFailed as exc:
            assert "SecurityError" in exc.reason or "MemoryError" in exc.reason, exc.reason
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * MB, f"{name}: {peak / MB:.0f} MB in the daemon's process"


def test_what_stays_plain_renders_here_within_its_bound(env: DagSandbox) -> None:
    """The filters plain templates may use, on inputs built to make them grow (escapes,
    case mappings that lengthen, characters as lists): each is plain, and its text is
    within the bound its cost promised."""
    tricky = "ﬃ'\"\\<&\x00\U000e0001 é\n" * 4
    scope = make_scope(
        {"s": tricky, "l": [tricky, "", 3, 1.5e300, None, True, [tricky]], "d": {tricky: [tricky]}},
        {"x": {"output": [tricky] * 3}},
    )
    templates = [
        "{{ inputs.s | upper }}{{ inputs.s | title }}{{ inputs.s | capitalize | lower }}",
        "{{ inputs.s | list }}{{ inputs.l | string | list }}{{ inputs.s | sort | reverse }}",
        "{{ inputs.s | unique | list }}{{ inputs.d | dictsort }}{{ inputs.l | first }}",
        "{{ inputs.s | tojson }}{{ inputs.l | tojson | e }}{{ inputs.d | escape | escape }}",
        "{{ inputs.l | join(', ') }}{{ inputs.s | join('--') }}{{ inputs.d | join }}",
        "{{ inputs.s | truncate(30, true, inputs.s[:9]) }}{{ inputs.s | trim | wordcount }}",
        "{{ [inputs.s, inputs.l, {'k': inputs.d}] }}{{ (inputs.s, inputs.s) | list }}",
        "{{ inputs.l[1:] }}{{ inputs.s[::-1] }}{{ nodes.x.output.output[0] ~ inputs.s }}",
        "{{ inputs.l[3] | int }}{{ inputs.l[3] + 1.1 }}{{ -inputs.l[3] }}",
        "{{ nodes.x.output.output | max }}{{ nodes.x.output.output | min | float }}",
        "{{ inputs.missing | default(inputs.s) }}{{ inputs.s if inputs.l else inputs.d }}",
        "{{ inputs.s.upper }}{{ inputs.d.items }}{{ inputs.l.2 | abs }}{{ inputs | length }}",
        "{% if inputs.s is string %}{{ inputs }}{% elif inputs.l %}x{% else %}{{ nodes }}"
        "{% endif %}",
    ]
    for source in templates:
        prepared = env.prepare(source)
        assert prepared.cost is not None, source
        bound = prepared.cost.measure(scope, budget=10**12)
        assert bound is not None, source
        text = render(env, source, scope)
        assert len(text) <= bound, f"{source}: {len(text)} > {bound}"


def test_plain_means_small_for_the_values_read() -> None:
    """The same template renders here over small values and in the worker over big ones;
    a separator, width or count taken from the inputs is never plain."""
    env = make_environment()
    assert env.worker is not None
    source = "Summarise {{ nodes.draft.output }} for {{ inputs.who | upper }}."
    small = make_scope({"who": "ann"}, {"draft": "a draft"})
    assert render(env, source, small) == "Summarise a draft for ANN."
    assert not env.worker.running
    big = make_scope({"who": "ann"}, {"draft": "x" * PLAIN_BUDGET})
    assert render(env, source, big).startswith("Summarise xxx")
    assert env.worker.running  # measured over the budget: rendered there
    for multiplying in (
        "inputs.l | join(inputs.s)",
        "inputs.s | replace('a', inputs.s)",
        "inputs.s | indent(inputs.n)",
        "inputs.s | center(inputs.n)",
        "inputs.s | wordwrap(inputs.n)",
        "inputs.s | tojson(inputs.n)",
        "inputs.s | round(inputs.n, 'floor')",
        "inputs.s | format(inputs.s)",
        "inputs.s * inputs.n",
        "inputs.s % inputs.l",
        "[inputs.s] * 3",
        "range(inputs.n)",
        "inputs.s.ljust(inputs.n)",
    ):
        assert env.prepare(multiplying, expression=True).cost is None, multiplying
    env.worker.close()


@pytest.mark.parametrize("here", [True, False], ids=["in-process", "worker"])
def test_each_wrapped_filter_works_with_its_arguments(here: bool) -> None:
    """``truncate`` and ``wordwrap`` lost Jinja's ``pass_environment`` in the wrapper that
    bounds their widths, and always failed; every wrapped filter, with real arguments."""
    env = sandbox_here() if here else make_environment()
    scope = make_scope(
        {"s": "the quick brown fox jumps over the lazy dog", "pad": "x" * 100_001}, {}
    )
    cases = {
        "{{ inputs.s | truncate(12) }}": "the...",
        "{{ inputs.s | truncate(12, true, '~') }}": "the quick b~",
        "{{ inputs.s | truncate(length=16, killwords=false, end='!', leeway=0) }}": "the quick!",
        "{{ inputs.s | wordwrap(16) }}": "the quick brown\nfox jumps over\nthe lazy dog",
        "{{ inputs.s | wordwrap(width=10, wrapstring=' / ') }}": (
            "the quick / brown fox / jumps over / the lazy / dog"
        ),
        "{{ 'ab' | center(6) }}|{{ 'ab' | center(width=4) }}": "  ab  | ab ",
        "{{ 'a\\nb' | indent(2) }}|{{ 'a\\nb' | indent('> ', true) }}": "a\n  b|> a\n> b",
        "{{ '%s-%05d' | format('x', 42) }}|{{ '%(k)s' | format(k='v') }}": "x-00042|v",
    }
    for source, expected in cases.items():
        assert render(env, source, scope) == expected, source
    for refused, says in (
        ("{{ inputs.s | truncate(10 ** 9) }}", "'truncate' with a width"),
        ("{{ inputs.s | wordwrap(10 ** 9) }}", "'wordwrap' with a width"),
        ("{{ inputs.s | indent(inputs.pad) }}", "'indent' with a width"),
    ):
        with pytest.raises(RenderFailed, match=says):
            render(env, refused, scope)
    if env.worker is not None:
        env.worker.close()
