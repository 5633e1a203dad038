"""27 known ways out of a Jinja2 sandbox read nothing (issue 16, "what must hold").

DAG templates come from whoever may start a run, so they are hostile by assumption. The
payloads below are the published ones (Jinja2's sandbox CVEs: format-string attribute
access, ``attr`` on escaped names, generator frames; PayloadsAllTheThings' SSTI list: MRO
walks to ``__subclasses__``, ``cycler``/``joiner``/``namespace``/``lipsum`` globals, Flask's
``config`` and ``request``, the ``catch_warnings`` loop) and the cost attacks (huge ranges,
doubling loops, unbounded macro recursion), plus what a DAG adds: mutating the run's own
inputs, and ``include``/``import`` of a file by path. Each goes through ``render`` (and
``check_assert``/``evaluate`` when it is an expression) and through a DAG over HTTP. Each
is refused, or renders harmlessly; none runs a command, reads a file or an environment
variable, or shows a Python object it should not.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pcrt.runtime.dag.template_render import check_assert, evaluate, render
from pcrt.runtime.dag.templates import DagSandbox, make_environment, make_scope
from pcrt.runtime.errors import AssertFailed, RenderFailed
from pcrt.runtime.server.settings import ServerSettings
from tests.fakes import FakeEngines
from tests.live_server import LiveServer, ServerFactory

ENV_NAME = "PCRT_TEST_SANDBOX_SECRET"
ENV_SECRET = "env-secret-" + secrets.token_hex(8)
FILE_SECRET = "file-secret-" + secrets.token_hex(8)
# what a leak would show: secrets, /etc/passwd, `id`, and reprs of Python internals (not
# words of the payloads themselves: an error may quote its template)
LEAK_SIGNS = (
    ENV_SECRET,
    FILE_SECRET,
    "root:",
    "uid=",
    "<class",
    "<module",
    "<function",
    "<built-in",
    "<bound method",
    "<frame",
    "<code",
    "<generator",
    "environ(",
    "'__builtins__':",
    "'__name__':",
)


@dataclass(frozen=True)
class Escape:
    name: str
    template: str  # {SECRET} and {MARKER} are filled in: a file to read, a file to create
    harmless: bool = False  # renders (to nothing it should not), rather than being refused

    def text(self, secret: Path, marker: Path) -> str:
        return self.template.replace("{SECRET}", str(secret)).replace("{MARKER}", str(marker))

    @property
    def is_expression(self) -> bool:
        inner = self.template.strip()
        return inner.startswith("{{") and inner.endswith("}}") and inner.count("{{") == 1


ESCAPES = [
    Escape("mro walk", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    Escape("base walk", "{{ [].__class__.__base__.__subclasses__() }}"),
    Escape("mro() of a global type", "{{ dict.mro()[1].__subclasses__() }}"),
    Escape("self globals", "{{ self.__init__.__globals__ }}"),
    Escape(
        "self's mangled context",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    ),
    Escape("cycler globals", "{{ cycler.__init__.__globals__.os.popen('touch {MARKER}').read() }}"),
    Escape("joiner globals", "{{ joiner.__init__.__globals__.os.environ }}"),
    Escape("namespace globals", "{{ namespace.__init__.__globals__.os.environ }}"),
    Escape("lipsum globals", "{{ lipsum.__globals__['os'].popen('touch {MARKER}').read() }}"),
    Escape("lipsum builtins open", "{{ lipsum.__globals__.__builtins__.open('{SECRET}').read() }}"),
    Escape("format-string attribute", "{{ '{0.__class__.__init__.__globals__}'.format(inputs) }}"),
    Escape("format_map attribute", "{{ '{x.__init__.__globals__}'.format_map({'x': cycler}) }}"),
    Escape("attr filter", "{{ inputs | attr('__class__') }}"),
    Escape("attr with escaped name", "{{ cycler | attr('\\x5f\\x5finit\\x5f\\x5f') }}"),
    Escape("map(attribute=)", "{{ [inputs] | map(attribute='__class__') | list }}", harmless=True),
    Escape("subscript with escaped name", "{{ ''['\\x5f\\x5fclass\\x5f\\x5f'] }}"),
    Escape(
        "Flask's request",
        "{{ request.application.__globals__.__builtins__.__import__('os')"
        ".popen('touch {MARKER}').read() }}",
    ),
    Escape(
        "Flask's config",
        "{{ config.__class__.__init__.__globals__['os'].popen('touch {MARKER}').read() }}",
    ),
    Escape(
        "catch_warnings loop",
        "{% for c in [].__class__.__base__.__subclasses__() %}"
        "{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['__import__']('os').popen('touch {MARKER}').read() }}"
        "{% endif %}{% endfor %}",
    ),
    Escape(
        "namespace as a smuggler",
        "{% set ns = namespace(a=cycler) %}{{ ns.a.__init__.__globals__ }}",
    ),
    Escape("generator frame", "{{ (range(3) | map('string')).gi_frame.f_back.f_globals }}"),
    Escape("mutate the run's inputs", "{{ inputs.l.append('changed') }}"),
    Escape("range(10**10)", "{% for i in range(10 ** 10) %}{% endfor %}"),
    Escape(
        "doubling loop",
        "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}"
        "{% endfor %}{{ ns.x | length }}",
    ),
    Escape("macro recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
    Escape("include a file", "{% include '{SECRET}' %}"),
    Escape("import a module", "{% import 'os' as os %}{{ os.environ }}"),
]


def test_there_are_27_distinct_escapes() -> None:
    assert len(ESCAPES) == 27
    assert len({e.name for e in ESCAPES}) == len({e.template for e in ESCAPES}) == 27


@pytest.fixture(scope="module")
def secrets_around(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A secret file, a marker path no command must create, and a secret in the
    environment of this process (so of the template worker and the daemon too)."""
    where = tmp_path_factory.mktemp("sandbox-secrets")
    secret = where / "secret.txt"
    secret.write_text(FILE_SECRET, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_NAME, ENV_SECRET)
        yield secret, where / "MARKER"


@pytest.fixture(scope="module")
def env(secrets_around: tuple[Path, Path]) -> DagSandbox:
    return make_environment()  # its worker starts after the secret is in the environment


def _no_leak(text: str, marker: Path, what: str) -> None:
    for sign in LEAK_SIGNS:
        assert sign not in text, f"{what}: {sign!r} in {text[:300]!r}"
    assert not marker.exists(), f"{what}: a command ran"


@pytest.mark.parametrize("escape", ESCAPES, ids=[e.name for e in ESCAPES])
def test_an_escape_through_render_and_assert_reads_nothing(
    env: DagSandbox, secrets_around: tuple[Path, Path], escape: Escape
) -> None:
    secret, marker = secrets_around
    text = escape.text(secret, marker)
    scope = make_scope({"s": "x", "l": ["x"]}, {"a": ["one"]})
    try:
        shown = render(env, text, scope)
    except RenderFailed as exc:
        assert not escape.harmless, exc.reason
        shown = str(exc)
    else:
        assert escape.harmless, f"rendered: {shown[:300]!r}"
    _no_leak(shown, marker, "render")
    if escape.is_expression:
        expression = text.strip()[2:-2].strip()
        try:
            check_assert(env, expression, scope)
            verdict = "held"
        except AssertFailed as exc:
            verdict = str(exc)
        _no_leak(verdict, marker, "check_assert")
        try:
            value = json.dumps(evaluate(env, expression, scope), default=str)
        except RenderFailed as exc:
            value = str(exc)
        _no_leak(value, marker, "evaluate")
    assert scope["inputs"] == {"s": "x", "l": ["x"]}
    assert scope["nodes"] == {"a": {"output": ["one"]}}


# -- through a DAG over HTTP ---------------------------------------------------------------

SINK = {
    "dag": "/lib/test/sink",
    "signature": {"inputs": ["x"], "outputs": {"got": {"value": "inputs.x"}}},
    "nodes": {"n": {"type": "assert", "that": "true"}},
}


@pytest.fixture(scope="module")
def server(secrets_around: tuple[Path, Path], module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(ServerSettings(), opener=FakeEngines())


@pytest.mark.parametrize("escape", ESCAPES, ids=[e.name for e in ESCAPES])
def test_an_escape_in_a_dag_over_http_reads_nothing(
    server: LiveServer, secrets_around: tuple[Path, Path], escape: Escape
) -> None:
    """The template as a subgraph call's input (rendered by the runner, its value the
    callee's output) and, for an expression, as an assert."""
    secret, marker = secrets_around
    text = escape.text(secret, marker)
    nodes: dict[str, object] = {
        "call": {
            "type": "subgraph",
            "dag": "/lib/test/sink",
            "inputs": {"x": text},
            "cache": False,
        }
    }
    if escape.is_expression:
        nodes["check"] = {"type": "assert", "that": text.strip()[2:-2].strip()}
    declared = {"s": {"default": "x"}, "l": {"type": "array", "default": ["x"]}}
    dag = {"dag": "/dynamic/escape", "inputs": declared, "nodes": nodes}
    reply = httpx.post(server.url + "/v1/dags", json={"dag": dag, "library": [SINK]}, timeout=60)
    _no_leak(reply.text, marker, "HTTP")
    assert reply.status_code in (200, 422), reply.text
    if reply.status_code == 200:
        run = reply.json()
        assert run["inputs"] == {"s": "x", "l": ["x"]}
        if not escape.harmless:
            assert run["status"] == "failed", run
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert os.environ[ENV_NAME] == ENV_SECRET  # nothing changed the environment either
