"""pcrt's exception tree: every error pcrt raises on purpose, in one place.

Every error a user can cause or meet is a subclass of ``PcrtError`` with a message that
says what went wrong and what to do. ``pcrt.runtime.server.http_errors`` maps each class
onto OpenAI's error shape and a status code (the one place that does); the CLI prints the
message without a traceback.

    PcrtError
    ├── ConfigError            bad models.toml / user file / settings (names file and key)
    ├── ModelNotFound          unknown model name, alias or tag
    ├── NotFound               no such thing of another kind (a DAG run); names the param
    │   ├── StateNotFound      no KV state blob with that id
    │   └── ToolNotFound       no tool by that name (or its MCP server did not start)
    ├── PullError              a model file could not be fetched or verified
    │   └── DownloadError      an HTTP download failed or its sha256 did not match
    ├── ModelLoadError         llama.cpp could not load the file or create a context
    │   └── PlanUnavailable    the GGUF lacks what the offload planner needs
    ├── ChatTemplateMissing    a chat request for a model without a template and no override
    ├── InvalidRequest         bad sampling parameters, bad schema or grammar, too many forks
    │   ├── ConstraintInvalid  a schema or grammar constrained decoding cannot take (names where)
    │   ├── ContextLengthExceeded  the prompt (plus what must be generated) does not fit
    │   ├── BodyTooLarge       a streamed upload past its bound (a peer's blob: 400)
    │   ├── StateTooLarge      a user's KV state upload over state_upload_max_bytes (413)
    │   ├── RequestTooLarge    a request body over its route's bound (413, before it is read)
    │   ├── EmptyBody          an upload without a byte
    │   ├── BadContentLength   a Content-Length header that is not a number
    │   ├── DagInvalid         a DAG that does not parse or validate: every Problem (422)
    │   │   └── ShapeInvalid   some nodes failed their shape check; the rest parsed
    │   └── RenderFailed       a template could not be rendered with the run's values
    ├── AssertFailed           an ``assert`` node's expression was false (fails the run)
    ├── BudgetExceeded         a DAG run spent its max_nodes, max_tokens, max_tool_calls or timeout
    ├── NeedsAttention         a tool call that must not be sent twice was in flight in a crash
    ├── StateError             a KV state blob is malformed or does not belong to this model
    │   ├── IncompatibleState  the compatibility key differs (other model, KV type, version)
    │   └── StateCorrupt       a stored or uploaded state fails its own checks (hash, header)
    ├── Conflict               clashes with what is here already (a run id another run holds)
    ├── StorageFull            the disk under PCRT_HOME refused a write (full or read-only)
    ├── EngineClosed           a request reached an engine that is shutting down
    ├── StreamFailed           a generation failed after it began (carries its status, body)
    ├── Unauthorized           a missing or wrong API key
    ├── HostRefused            a keyless daemon asked by a name or a page not its own
    ├── ToolDenied             the agent's tool permissions do not name it (nothing is sent)
    ├── RetryLater             the request may succeed later (carries retry_after seconds)
    │   ├── RateLimited        the agent is over its requests or tokens per minute
    │   └── Overloaded         the model's queue is full, or the daemon is draining
    ├── PeerError              work sent to a peer did not come back (names the peer)
    │   ├── PeerUnavailable    no answer, a timeout or a server error: try the next candidate
    │   └── PeerRejected       the peer refused the request itself (carries its status, body)
    └── NoRoute                nowhere qualifies to run the work (says why for each node)

Outside the tree, because ``cache`` and ``device`` import nothing of pcrt's: the stores
raise ``RunNotFound`` and ``RunExists`` (``cache.runs``), ``BlobMissing`` and
``BlobCorrupt`` (``cache.blobs``); the offload planner raises ``PlanError``
(``device.offload``). Their callers turn them into the errors above where a user meets
them (a missing run is ``NotFound``, a corrupt blob a ``StateError`` or a recompute).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AssertFailed",
    "BadContentLength",
    "BodyTooLarge",
    "BudgetExceeded",
    "ChatTemplateMissing",
    "ConfigError",
    "Conflict",
    "ConstraintInvalid",
    "ContextLengthExceeded",
    "DagInvalid",
    "DownloadError",
    "EmptyBody",
    "EngineClosed",
    "HostRefused",
    "IncompatibleState",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "NeedsAttention",
    "NoRoute",
    "NotFound",
    "Overloaded",
    "PcrtError",
    "PeerError",
    "PeerRejected",
    "PeerUnavailable",
    "PlanUnavailable",
    "Problem",
    "PullError",
    "RateLimited",
    "RenderFailed",
    "RequestTooLarge",
    "RetryLater",
    "ShapeInvalid",
    "StateCorrupt",
    "StateError",
    "StateNotFound",
    "StateTooLarge",
    "StorageFull",
    "StreamFailed",
    "ToolDenied",
    "ToolNotFound",
    "Unauthorized",
]


class PcrtError(Exception):
    """Base of every error pcrt raises on purpose."""


class ConfigError(PcrtError):
    pass


class ModelNotFound(PcrtError):
    pass


class NotFound(PcrtError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field that named it


class StateNotFound(NotFound):
    def __init__(self, state_id: str) -> None:
        super().__init__(f"no KV state {state_id!r}", param="id")
        self.state_id = state_id


class ToolNotFound(NotFound):
    """No tool of the registry has that name: never configured, or listed by an MCP
    server that did not start (the registry's problems say which)."""

    def __init__(self, name: str, hint: str = "") -> None:
        super().__init__(f"no tool {name!r}{hint}", param="name")
        self.name = name


class PullError(PcrtError):
    pass


class DownloadError(PullError):
    """``status`` is the HTTP status when the server answered with an error, else None."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ModelLoadError(PcrtError):
    pass


class PlanUnavailable(ModelLoadError):
    """The GGUF lacks what the planner needs (e.g. per-layer head counts given as arrays)."""


class ChatTemplateMissing(PcrtError):
    pass


class InvalidRequest(PcrtError):
    # the request field at fault, when the code that refuses it knows (OpenAI's "param")
    param: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class ConstraintInvalid(InvalidRequest):
    """A schema or grammar pcrt cannot constrain to. ``where`` is the path inside the
    schema (``properties.tags.uniqueItems``) when known; the HTTP layer prefixes the
    request field that held it (``param``)."""

    def __init__(self, source: Literal["json_schema", "grammar"], where: str, why: str) -> None:
        self.source = source
        self.where = where
        self.why = why
        self.param: str | None = None
        at = f" at {where}" if where else ""
        what = "JSON schema" if source == "json_schema" else "grammar"
        super().__init__(f"the {what}{at}: {why}")


class ContextLengthExceeded(InvalidRequest):
    # ``param``: the request field that holds the text ("messages", "prompt", "input"):
    # the engine cannot know it, the HTTP route that catches this sets it
    pass


class BodyTooLarge(InvalidRequest):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the state is over the {limit}-byte upload limit")
        self.limit = limit


class StateTooLarge(InvalidRequest):
    """A KV state upload over ``state_upload_max_bytes``, by its Content-Length (``size``)
    or while it streams (``size`` None): the rest of its body is never read."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        got = f"{size} bytes" if size is not None else "more"
        super().__init__(
            f"the state is too large: {got}, the limit is {limit} bytes (state_upload_max_bytes)"
        )
        self.limit = limit
        self.size = size


class RequestTooLarge(InvalidRequest):
    """A request body over the bound of its route (``limit`` bytes, the setting that sets
    it named in ``setting``), by its Content-Length (``size``) or while it streams
    (``size`` None): the rest of the body is never read."""

    def __init__(self, limit: int, size: int | None = None, setting: str | None = None) -> None:
        got = f"{size} bytes" if size is not None else f"over {limit} bytes"
        where = f" ({setting} in [server])" if setting else ""
        super().__init__(
            f"the request body is too large: {got}, the limit for this route is "
            f"{limit} bytes{where}"
        )
        self.limit = limit
        self.size = size
        self.setting = setting


class EmptyBody(InvalidRequest):
    pass


class BadContentLength(InvalidRequest):
    pass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a DAG: which node (None for the document), which field, what."""

    message: str
    node: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = []
        if self.node is not None:
            where.append(f"node {self.node!r}")
        if self.field is not None:
            where.append(self.field)
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DagInvalid(InvalidRequest):
    """A DAG that does not parse or does not validate; ``problems`` lists all of it, not
    only the first, so that an author (or an agent generating DAGs) fixes them in one
    round."""

    def __init__(self, problems: Iterable[Problem], *, source: str | None = None) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        head = f"invalid DAG{f' {source}' if source else ''}"
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{head}: {count} {noun}\n{lines}" if count else head)

    def to_list(self) -> list[dict[str, Any]]:
        """The problems as plain dicts (the body of an HTTP 422)."""
        return [{"node": p.node, "field": p.field, "message": p.message} for p in self.problems]


class ShapeInvalid(DagInvalid):
    """Some nodes failed their shape check, the others parsed into ``partial`` (a
    ``DagSpec``): ``problems`` are the shape problems and those found in ``partial``."""

    def __init__(
        self, partial: Any, problems: Iterable[Problem], *, source: str | None = None
    ) -> None:
        self.partial = partial
        super().__init__(problems, source=source)


class RenderFailed(InvalidRequest):
    """A prompt or input template failed at run time (an undefined value, a sandbox refusal)."""

    def __init__(self, template: str, reason: str, *, node: str | None = None) -> None:
        self.template = template
        self.reason = reason
        self.node = node
        where = f"node {node!r}: " if node else ""
        super().__init__(f"{where}cannot render {_clip(template)!r}: {reason}")


class AssertFailed(PcrtError):
    """An assertion did not hold; the message shows the expression and the values it read."""

    def __init__(
        self,
        expression: str,
        values: Mapping[str, str],
        *,
        node: str | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        self.expression = expression
        self.values = dict(values)
        self.node = node
        self.reason = reason
        where = f"node {node!r}: " if node else ""
        if message:
            where += f"{message}: "
        what = f"could not evaluate ({reason})" if reason else "is false"
        shown = "; ".join(f"{name} = {value}" for name, value in self.values.items())
        tail = f" with {shown}" if shown else ""
        super().__init__(f"{where}assertion {expression!r} {what}{tail}")


class BudgetExceeded(PcrtError):
    """``limit``: which of the run's budget ran out (max_nodes, max_tokens, timeout_sec)."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(f"budget exceeded: {limit} ({detail})")
        self.limit = limit


class NeedsAttention(PcrtError):
    """A run stops for a person: a tool call was in flight when the daemon died, and its
    tool is not idempotent, so sending it again might do twice what it does (a payment,
    an email). ``calls``: those calls as ``pcrt dag status`` shows them."""

    def __init__(self, run_id: str, calls: list[dict[str, Any]]) -> None:
        self.run_id = run_id
        self.calls = calls
        shown = "; ".join(
            f"{c['tool']}({json.dumps(c['arguments'], ensure_ascii=False)[:200]}) at node "
            f"{c['node']!r}"
            for c in calls
        )
        super().__init__(
            f"needs attention: a call was in flight when the daemon stopped and its tool is "
            f"not idempotent: {shown}. Decide: pcrt dag resume {run_id} --retry-call (send it "
            f"again) or --skip-call RESULT_JSON (it was done; this was its result)"
        )


class StateError(PcrtError):
    pass


class StorageFull(PcrtError):
    pass


class IncompatibleState(StateError):
    pass


class StateCorrupt(StateError):
    pass


class Conflict(PcrtError):
    pass


class EngineClosed(PcrtError):
    pass


class Unauthorized(PcrtError):
    pass


class HostRefused(PcrtError):
    """A request to a daemon without an API key whose ``Host`` is no loopback name and
    not in ``allowed_hosts`` (what a web page that rebinds its own DNS name to 127.0.0.1
    sends, to read a local API through the visitor's browser), or whose ``Origin`` is
    another site's page (which can make a browser post to 127.0.0.1 blind)."""


class ToolDenied(PcrtError):
    """An agent asked for a tool its ``[tools.permissions]`` do not allow; raised before
    anything is sent to the tool."""

    def __init__(self, name: str, agent: str) -> None:
        super().__init__(
            f"agent {agent!r} may not call tool {name!r} (see [tools.permissions] in the "
            "daemon's config)"
        )
        self.name = name
        self.agent = agent


class RetryLater(PcrtError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryLater):
    pass


class Overloaded(RetryLater):
    pass


class PeerError(PcrtError):
    def __init__(self, message: str, *, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


class PeerUnavailable(PeerError):
    """``cooldown``: whether the peer should leave rotation (not for a plain "busy")."""

    def __init__(
        self,
        message: str,
        *,
        peer: str,
        cooldown: bool = True,
        status: int | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message, peer=peer)
        self.cooldown = cooldown
        self.status = status  # the peer's HTTP status, when it answered
        self.timed_out = timed_out  # slow, not refused: it may just be busy


class PeerRejected(PeerError):
    """The peer answered with a client error; its OpenAI-shaped body passes through."""

    def __init__(self, message: str, *, peer: str, status: int, body: dict[str, Any]) -> None:
        super().__init__(message, peer=peer)
        self.status = status
        self.body = body


class NoRoute(PcrtError):
    pass


class StreamFailed(PcrtError):
    """A generation failed after its stream had begun (the engine, or a peer mid-stream):
    what another API's route says when it collects the whole answer. ``status`` and
    ``body``: the error event the stream ended with, as OpenAI's chunks carry it."""

    def __init__(self, message: str, *, status: int, body: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
