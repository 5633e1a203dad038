"""Every error leaves the HTTP surface in OpenAI's shape, with the right status.

``{"error": {"message", "type", "param", "code"}}``; 400 bad request, 401 bad key,
403 a tool the agent may not call, 404 unknown model, tool or route (or nowhere to run
it), 502 a peer that did not answer, 409 incompatible state or a conflict, 413 a request
body or a state upload over its limit, 429 rate limit, 503 overloaded. Nothing answers a
bare 500: an unexpected failure is logged and answered with a 500 in the same shape. A
client that left before its answer is accounted (and, when anything is still sent,
answered) 499, as nginx logs it.

This is the one module that knows status codes: routes and the serving layer raise
pcrt's errors and let the handlers installed here answer them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pcrt.runtime.errors import (
    BadContentLength,
    ChatTemplateMissing,
    Conflict,
    ConstraintInvalid,
    ContextLengthExceeded,
    DagInvalid,
    EmptyBody,
    EngineClosed,
    HostRefused,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NeedsAttention,
    NoRoute,
    NotFound,
    PcrtError,
    PeerRejected,
    PeerUnavailable,
    PullError,
    RateLimited,
    RequestTooLarge,
    RetryLater,
    StateCorrupt,
    StateError,
    StateNotFound,
    StateTooLarge,
    StorageFull,
    StreamFailed,
    ToolDenied,
    ToolNotFound,
    Unauthorized,
)

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "client_left",
    "error_body",
    "error_response",
    "in_shape_of",
    "install_error_handlers",
    "status_and_body",
]

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's: the client went away before its answer


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_and_body(exc: PcrtError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, body and headers for one of pcrt's errors."""
    msg = str(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, RateLimited):
            return 429, error_body(msg, "rate_limit_error", None, "rate_limit_exceeded"), headers
        return 503, error_body(msg, "server_overloaded", None, "overloaded"), headers
    if isinstance(exc, PeerRejected):  # the peer's own error passes through
        body = (
            exc.body
            if isinstance(exc.body.get("error"), dict)
            else error_body(msg, "invalid_request_error", None, None)
        )
        return exc.status, body, headers
    if isinstance(exc, StreamFailed):
        return exc.status, exc.body, headers
    if isinstance(exc, PeerUnavailable):
        return 502, error_body(msg, "server_error", None, "peer_unavailable"), headers
    if isinstance(exc, NoRoute):
        return 404, error_body(msg, "invalid_request_error", "model", "no_route"), headers
    if isinstance(exc, StateNotFound):
        return 404, error_body(msg, "invalid_request_error", exc.param, "state_not_found"), headers
    if isinstance(exc, ToolNotFound):
        return 404, error_body(msg, "invalid_request_error", exc.param, "tool_not_found"), headers
    if isinstance(exc, NotFound):
        return 404, error_body(msg, "invalid_request_error", exc.param, "not_found"), headers
    if isinstance(exc, ModelNotFound):
        return 404, error_body(msg, "invalid_request_error", "model", "model_not_found"), headers
    if isinstance(exc, DagInvalid):
        body = error_body(msg, "invalid_request_error", "dag", "invalid_dag")
        body["error"]["problems"] = exc.to_list()
        return 422, body, headers
    if isinstance(exc, ContextLengthExceeded):
        body = error_body(msg, "invalid_request_error", exc.param, "context_length_exceeded")
        return 400, body, headers
    if isinstance(exc, StateTooLarge):
        # the rest of the body is never read: the connection cannot be reused
        headers["Connection"] = "close"
        return 413, error_body(msg, "invalid_request_error", None, "state_too_large"), headers
    if isinstance(exc, RequestTooLarge):
        headers["Connection"] = "close"  # as above
        return 413, error_body(msg, "invalid_request_error", None, "request_too_large"), headers
    if isinstance(exc, EmptyBody):
        return 400, error_body(msg, "invalid_request_error", None, "empty_body"), headers
    if isinstance(exc, BadContentLength):
        body = error_body(msg, "invalid_request_error", None, "invalid_content_length")
        return 400, body, headers
    if isinstance(exc, ConstraintInvalid):
        code = "invalid_schema" if exc.source == "json_schema" else "invalid_grammar"
        return 400, error_body(msg, "invalid_request_error", exc.param, code), headers
    if isinstance(exc, InvalidRequest):
        return 400, error_body(msg, "invalid_request_error", exc.param, None), headers
    if isinstance(exc, ChatTemplateMissing):
        return 400, error_body(msg, "invalid_request_error", None, None), headers
    if isinstance(exc, Conflict):
        return 409, error_body(msg, "invalid_request_error", None, "conflict"), headers
    if isinstance(exc, NeedsAttention):
        return 409, error_body(msg, "invalid_request_error", None, "needs_attention"), headers
    if isinstance(exc, StateCorrupt):
        return 409, error_body(msg, "invalid_request_error", "state", "state_corrupt"), headers
    if isinstance(exc, StateError):
        return 409, error_body(msg, "invalid_request_error", "state", "incompatible_state"), headers
    if isinstance(exc, StorageFull):
        return 507, error_body(msg, "server_error", None, "insufficient_storage"), headers
    if isinstance(exc, ToolDenied):
        return 403, error_body(msg, "permission_error", "name", "tool_denied"), headers
    if isinstance(exc, HostRefused):
        return 403, error_body(msg, "permission_error", None, "host_not_allowed"), headers
    if isinstance(exc, Unauthorized):
        return 401, error_body(msg, "invalid_request_error", None, "invalid_api_key"), headers
    if isinstance(exc, PullError | EngineClosed):
        headers["Retry-After"] = "5"
        return 503, error_body(msg, "server_error", None, "model_unavailable"), headers
    if isinstance(exc, ModelLoadError):
        return 500, error_body(msg, "server_error", None, "model_load_failed"), headers
    return 500, error_body(msg, "server_error", None, None), headers


def error_response(exc: PcrtError, path: str = "") -> JSONResponse:
    """One of pcrt's errors as the response that answers it, in the shape of the API
    ``path`` belongs to."""
    status, body, headers = status_and_body(exc)
    return JSONResponse(in_shape_of(path, status, body), status_code=status, headers=headers)


# Anthropic's error types by status (its SDK raises a class per type)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def in_shape_of(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body in the shape of the API ``path`` belongs to: Ollama's
    routes (``/api/...``) answer ``{"error": message}``, Anthropic's (``/v1/messages``)
    ``{"type": "error", "error": {"type", "message"}}``; the rest stay OpenAI's."""
    error = body.get("error")
    if not isinstance(error, dict):
        return body
    message = str(error.get("message") or "")
    # neither Ollama's error nor Anthropic's has a field for the param: the message names it
    param = error.get("param")
    if isinstance(param, str) and param and param not in message:
        named = f"{param}: {message}"
    else:
        named = message
    if path.startswith("/api/"):
        return {"error": named}
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        message = named
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPES.get(status, fallback)
        return {"type": "error", "error": {"type": kind, "message": message}}
    return body


def client_left() -> JSONResponse:
    """The answer to a request whose client disconnected while it ran: nobody reads it."""
    return JSONResponse({}, status_code=CLIENT_CLOSED_REQUEST)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PcrtError)
    async def _pcrt(request: Request, exc: PcrtError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in errors
            )
        # a JSON syntax error's location is a character offset, not a field
        param = None if first.get("type") == "json_invalid" else ".".join(loc) or None
        body = error_body(message, "invalid_request_error", param, None)
        return JSONResponse(in_shape_of(request.url.path, 400, body), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = error_body(str(exc.detail), "invalid_request_error", None, code)
        return JSONResponse(
            in_shape_of(request.url.path, exc.status_code, body),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RecursionError):  # a document nested past Python's stack
            log.warning("refused a request nested too deeply to process")
            body = error_body(
                "the request nests too deeply to process",
                "invalid_request_error",
                None,
                "nested_too_deeply",
            )
            return JSONResponse(in_shape_of(request.url.path, 400, body), status_code=400)
        log.exception("unexpected error while serving a request")
        body = error_body(f"internal error: {type(exc).__name__}", "server_error", None, None)
        return JSONResponse(in_shape_of(request.url.path, 500, body), status_code=500)
