"""The dashboard at ``/ui``: its static files (``runtime/server/ui/``, no build step, no
Node) and its login. The pages read the daemon's own JSON routes with the key; nothing
here computes.

Every file is served with a Content-Security-Policy that allows this origin's scripts,
styles and calls only: the pages build their DOM from text, never from HTML, and a
policy that forbids inline script makes a slip there inert."""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from pcrt.runtime.errors import InvalidRequest, NotFound
from pcrt.runtime.server.ui_session import LOGIN_PATH, UI_PREFIX
from pcrt.runtime.server.ui_site import UiSite

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

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


def _site(request: Request) -> UiSite:
    site: UiSite = request.app.state.ui
    return site


def _page(site: UiSite, name: str, status_code: int = 200, text: str | None = None) -> Response:
    found = site.files.get(name)
    if found is None:
        raise NotFound(f"the dashboard has no file {name!r}", param="name")
    body, kind = found
    return Response(
        body if text is None else text, status_code=status_code, media_type=kind, headers=_HEADERS
    )


@router.get(UI_PREFIX)
async def root() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX + "/", status_code=308)


@router.get(UI_PREFIX + "/")
async def index(request: Request) -> Response:
    return _page(_site(request), "index.html")


@router.get(LOGIN_PATH)
async def login_page(request: Request) -> Response:
    site = _site(request)
    if site.api_key is None:
        return RedirectResponse(UI_PREFIX + "/", status_code=303)  # nothing to log in to
    return _page(site, "login.html")


@router.post(LOGIN_PATH)
async def login(request: Request) -> Response:
    """A form's ``key``: right, the cookie that opens the pages and the dashboard; wrong,
    the form again with a 401 (no hint of how wrong)."""
    site = _site(request)
    if site.api_key is None:
        return RedirectResponse(UI_PREFIX + "/", status_code=303)
    try:
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=8)
    except ValueError:
        raise InvalidRequest("send the login form: key=...", param="key") from None
    if not site.login_matches((form.get("key") or [""])[0].strip()):
        page = site.files["login.html"][0].replace("<!-- message -->", _WRONG_KEY)
        return _page(site, "login.html", 401, page)
    answer = RedirectResponse(UI_PREFIX + "/", status_code=303)
    answer.headers["Set-Cookie"] = site.login_cookie(secure=request.url.scheme == "https")
    return answer


@router.post(UI_PREFIX + "/logout")
async def logout(request: Request) -> Response:
    answer = RedirectResponse(LOGIN_PATH, status_code=303)
    answer.headers["Set-Cookie"] = _site(request).logout_cookie()
    return answer


@router.get(UI_PREFIX + "/{name}")
async def asset(name: str, request: Request) -> Response:
    return _page(_site(request), name)
