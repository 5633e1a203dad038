"""The dashboard as the app serves it (``routes/ui.py``): its files, read from the package
once when the app is built; the key its login checks (the guard's own); its cookie."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from pcrt.runtime.server.ui_session import clearing_cookie, cookie_name, login_cookie

__all__ = ["UiSite"]

_SERVED = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class UiSite:
    files: Mapping[str, tuple[str, str]]  # name -> (text, content type)
    api_key: str | None
    cookie: str

    @classmethod
    def load(cls, api_key: str | None, port: int) -> UiSite:
        """The package's dashboard files (``runtime/server/ui/``: nothing else is ever
        served, whatever a path says)."""
        files = {}
        for entry in resources.files("pcrt.runtime.server.ui").iterdir():
            kind = _SERVED.get(entry.name.rpartition(".")[2])
            if kind is not None and entry.is_file():
                files[entry.name] = (entry.read_text(encoding="utf-8"), kind)
        return cls(files, api_key, cookie_name(port))

    def login_matches(self, given: str) -> bool:
        """Whether a login form's key is the daemon's (in constant time)."""
        assert self.api_key is not None
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def login_cookie(self, *, secure: bool) -> str:
        assert self.api_key is not None
        return login_cookie(self.cookie, self.api_key, secure=secure)

    def logout_cookie(self) -> str:
        return clearing_cookie(self.cookie)
