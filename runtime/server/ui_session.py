"""The dashboard's login: a browser cannot send a bearer key with a page load, so a person
who typed the API key on ``/ui/login`` gets a cookie that stands for it.

The cookie holds an HMAC of the key (never the key), so it is the same for every daemon
with that key and stops working when the key changes. It is ``HttpOnly`` (no script
reads it) and ``SameSite=Strict``; other sites on this host (another port is the same
*site*) can still make a browser send it, so the guard takes it alone only for reads
(GET, HEAD) and asks every other method for the ``X-PC-UI`` header as well: a header a
cross-origin page cannot add without a CORS preflight, which the daemon never grants."""

from __future__ import annotations

import hashlib
import hmac
from http.cookies import CookieError, SimpleCookie

__all__ = [
    "COOKIE",
    "KEYLESS_PATHS",
    "LOGIN_PATH",
    "UI_HEADER",
    "UI_PREFIX",
    "cookie_value",
    "session_of",
    "session_proves",
    "session_token",
]

COOKIE = "pcrt_ui"
UI_HEADER = "x-pc-ui"  # sent by the dashboard's scripts with every call that changes state
UI_PREFIX = "/ui"
LOGIN_PATH = "/ui/login"  # needs no key: it is where a person gives it
# what answers without the key (bodies still bounded): the login page and its stylesheet,
# which holds nothing but colours
KEYLESS_PATHS = frozenset({LOGIN_PATH, UI_PREFIX + "/app.css"})
_PURPOSE = b"pcrt dashboard session v1"
_READS = frozenset({"GET", "HEAD"})


def session_token(api_key: str) -> str:
    """What the cookie holds for this key."""
    return hmac.new(api_key.encode(), _PURPOSE, hashlib.sha256).hexdigest()


def session_of(cookie_header: bytes | None) -> str | None:
    """The dashboard cookie's value in a ``Cookie`` header, if any."""
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header.decode("latin-1"))
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def session_proves(session: str | None, api_key: str, method: str, ui_header: bool) -> bool:
    """Whether a dashboard cookie stands for the key on this request (in constant time)."""
    same = hmac.compare_digest((session or "").encode(), session_token(api_key).encode())
    return same and session is not None and (method in _READS or ui_header)


def cookie_value(api_key: str, *, secure: bool) -> str:
    """The ``Set-Cookie`` value that logs a browser in (for 30 days, or until the key
    changes); ``secure`` when the page came over HTTPS."""
    attributes = f"{COOKIE}={session_token(api_key)}; Path=/; Max-Age=2592000; HttpOnly"
    return attributes + "; SameSite=Strict" + ("; Secure" if secure else "")
