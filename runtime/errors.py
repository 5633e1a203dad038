"""pcrt's exception tree.

Every error a user can cause or meet is a subclass of ``PcrtError`` with a message that
says what went wrong and what to do. The HTTP layer maps each class onto OpenAI's error
shape and a status code; the CLI prints the message without a traceback.

    PcrtError
    ├── ConfigError            bad models.toml / user file / settings (names file and key)
    ├── ModelNotFound          unknown model name, alias or tag
    ├── NotFound               no such thing of another kind (a DAG run); names the param
    ├── PullError              a model file could not be fetched or verified
    │   └── DownloadError      an HTTP download failed or its sha256 did not match
    ├── ModelLoadError         llama.cpp could not load the file or create a context
    ├── ChatTemplateMissing    a chat request for a model without a template and no override
    ├── InvalidRequest         bad sampling parameters, bad schema or grammar, too many forks
    │   └── ContextLengthExceeded  the prompt (plus what must be generated) does not fit
    ├── StateError             a KV state blob is malformed or does not belong to this model
    │   └── IncompatibleState  the compatibility key differs (other model, KV type, version)
    ├── Conflict               clashes with what is here already (a run id another run holds)
    ├── StorageFull            the disk under PCRT_HOME refused a write (full or read-only)
    ├── EngineClosed           a request reached an engine that is shutting down
    ├── Unauthorized           a missing or wrong API key
    ├── RetryLater             the request may succeed later (carries retry_after seconds)
    │   ├── RateLimited        the agent is over its requests or tokens per minute
    │   └── Overloaded         the model's queue is full, or the daemon is draining
    └── PeerError              work sent to a peer did not come back (names the peer)
        ├── PeerUnavailable    no answer, a timeout or a server error: try the next candidate
        ├── PeerRejected       the peer refused the request itself (carries its status, body)
        └── NoRoute            nowhere qualifies to run the work (says why for each node)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChatTemplateMissing",
    "ConfigError",
    "Conflict",
    "ContextLengthExceeded",
    "DownloadError",
    "EngineClosed",
    "IncompatibleState",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "NoRoute",
    "NotFound",
    "PcrtError",
    "PeerError",
    "PeerRejected",
    "PeerUnavailable",
    "Overloaded",
    "PullError",
    "RateLimited",
    "RetryLater",
    "StateError",
    "StorageFull",
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


class PullError(PcrtError):
    pass


class DownloadError(PullError):
    """``status`` is the HTTP status when the server answered with an error, else None."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ModelLoadError(PcrtError):
    pass


class ChatTemplateMissing(PcrtError):
    pass


class InvalidRequest(PcrtError):
    pass


class ContextLengthExceeded(InvalidRequest):
    # the request field that holds the text ("messages", "prompt", "input"): the engine
    # cannot know it, the HTTP route that catches this sets it for the OpenAI error's param
    param: str | None = None


class StateError(PcrtError):
    pass


class StorageFull(PcrtError):
    pass


class IncompatibleState(StateError):
    pass


class Conflict(PcrtError):
    pass


class EngineClosed(PcrtError):
    pass


class Unauthorized(PcrtError):
    pass


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
