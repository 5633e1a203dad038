"""The dashboard: its static files (``runtime/server/ui/``, no build step, no Node) and its
login, at ``/ui``. The pages read the daemon's own JSON routes; nothing here computes.

Every file is served with a Content-Security-Policy that allows this origin's scripts,
styles and calls only: the pages build their DOM from text, never from HTML, and a
policy that forbids inline script makes a slip there inert."""

from __future__ import annotations

import hmac
from importlib import resources
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from pcrt.runtime.server.services import services_of
from pcrt.runtime.server.ui_session import COOKIE, LOGIN_PATH, UI_PREFIX, cookie_value

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new pcrt's pages replace the old at once
}
_WRONG_KEY = '<p class="error" role="alert">That is not this daemon\'s API key.</p>'


def _file(name: str) -> str | None:
    """A file of the dashboard's package folder, or None for any other name (no paths:
    the names are the folder's own files, nothing else is ever opened)."""
    folder = resources.files("pcrt.runtime.server.ui")
    if "/" in name or "\\" in name or name.startswith(".") or name.endswith(".py"):
        return None
    entry = folder / name
    return entry.read_text(encoding="utf-8") if entry.is_file() else None


def _page(name: str, status_code: int = 200, text: str | None = None) -> Response:
    body = text if text is not None else _file(name)
    if body is None:
        return Response("not found", status_code=404, headers=_HEADERS)
    kind = _TYPES.get(name[name.rfind(".") :], "text/plain; charset=utf-8")
    return Response(body, status_code=status_code, media_type=kind, headers=_HEADERS)


@router.get(UI_PREFIX)
async def root() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX + "/", status_code=308)


@router.get(UI_PREFIX + "/")
async def index() -> Response:
    return _page("index.html")


@router.get(LOGIN_PATH)
async def login_page(request: Request) -> Response:
    if services_of(request).settings.resolved_api_key() is None:
        return RedirectResponse(UI_PREFIX + "/", status_code=303)  # nothing to log in to
    return _page("login.html")


@router.post(LOGIN_PATH)
async def login(request: Request) -> Response:
    """A form's ``key``: right, a cookie that stands for it and the dashboard; wrong, the
    form again with a 401 (no hint of how wrong)."""
    api_key = services_of(request).settings.resolved_api_key()
    if api_key is None:
        return RedirectResponse(UI_PREFIX + "/", status_code=303)
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    given = (form.get("key") or [""])[0].strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        page = (_file("login.html") or "").replace("<!-- message -->", _WRONG_KEY)
        return _page("login.html", 401, page)
    answer = RedirectResponse(UI_PREFIX + "/", status_code=303)
    secure = request.url.scheme == "https"
    answer.headers["Set-Cookie"] = cookie_value(api_key, secure=secure)
    return answer


@router.post(UI_PREFIX + "/logout")
async def logout() -> Response:
    answer = RedirectResponse(LOGIN_PATH, status_code=303)
    answer.headers["Set-Cookie"] = f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
    return answer


@router.get(UI_PREFIX + "/{name}")
async def asset(name: str) -> Response:
    return _page(name)
