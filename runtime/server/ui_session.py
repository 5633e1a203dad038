"""The dashboard's login. A browser cannot send a bearer key with a page load, so the
dashboard's pages (its static files: the package's own code, no data) open with a cookie,
and its calls to the daemon carry the key itself as a bearer token, which the page keeps
in the browser's storage for this origin.

The cookie only opens pages: browsers send a cookie to every port of a host, so any
other local service could read it, and it must stand for nothing more than the files any
install of pcrt holds. It holds an HMAC of the key (never the key), is named after the
daemon's port (two daemons on one host keep their own), ``HttpOnly`` and
``SameSite=Strict``. Every call that reads or changes the daemon's state needs the key
as every client does, so a cross-site page has nothing to forge."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import cookie_parser

__all__ = [
    "KEYLESS_PATHS",
    "LOGIN_PATH",
    "UI_PREFIX",
    "clearing_cookie",
    "cookie_name",
    "is_ui_page",
    "login_cookie",
    "opens_pages",
    "session_of",
]

UI_PREFIX = "/ui"
LOGIN_PATH = "/ui/login"  # needs no key: it is where a person gives it
# what answers without the key (bodies still bounded): the login page, its script and
# stylesheet
KEYLESS_PATHS = frozenset({LOGIN_PATH, UI_PREFIX + "/login.js", UI_PREFIX + "/app.css"})
_PURPOSE = b"pcrt dashboard pages v1"
_READS = frozenset({"GET", "HEAD"})
_MONTH = 30 * 86400


def cookie_name(port: int) -> str:
    return f"pcrt_ui_{port}"


def is_ui_page(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def _token(api_key: str) -> str:
    return hmac.new(api_key.encode(), _PURPOSE, hashlib.sha256).hexdigest()


def session_of(cookie_header: bytes | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (read as browsers write them:
    another app's odd cookie beside it does not hide it)."""
    if not cookie_header:
        return None
    return cookie_parser(cookie_header.decode("latin-1")).get(name)


def opens_pages(session: str | None, api_key: str, method: str, path: str) -> bool:
    """Whether a request is a read of a dashboard page with the cookie that stands for
    the key (compared in constant time); nothing else passes by cookie."""
    if session is None or method not in _READS or not is_ui_page(path):
        return False
    return hmac.compare_digest(session.encode(), _token(api_key).encode())


def login_cookie(name: str, api_key: str, *, secure: bool) -> str:
    """The ``Set-Cookie`` value that opens the pages for 30 days (or until the key
    changes); ``secure`` when the page came over HTTPS."""
    value = f"{name}={_token(api_key)}; Path={UI_PREFIX}; Max-Age={_MONTH}; HttpOnly"
    return value + "; SameSite=Strict" + ("; Secure" if secure else "")


def clearing_cookie(name: str) -> str:
    return f"{name}=; Path={UI_PREFIX}; Max-Age=0; HttpOnly; SameSite=Strict"
