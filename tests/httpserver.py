"""A real HTTP server for download and pull tests, bound to 127.0.0.1 on a free port.

It serves byte resources with ``Range`` support (206, 416), can drop the connection after N
bytes (to test resuming), can ignore ranges, delay, demand a bearer token or redirect; and it
lays out a PEP 503 / PEP 691 simple index and Hugging Face's ``/{owner}/{repo}/resolve/
{revision}/{file}`` URLs (redirecting to a "CDN" path, as the Hub does). Every request is
recorded so tests can assert what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["LocalServer", "Recorded", "Resource", "make_wheel", "sha256_hex"]

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(name: str, version: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    """Build a minimal ``py3-none-any`` wheel in memory (deterministic); returns (filename,
    bytes)."""
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: pcrt-tests\nRoot-Is-Purelib: true\n"
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():  # fixed timestamps: the same input, the same bytes
            member = zipfile.ZipInfo(path, date_time=(2024, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(member, data)
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


@dataclass
class Resource:
    """What the server answers for one path."""

    body: bytes = b""
    content_type: str = "application/octet-stream"
    status: int = 200
    ranges: bool = True
    """Honour ``Range`` (False: answer 200 with the whole body, as some servers do)."""
    cut_after: int | None = None
    """Drop the connection after this many body bytes, ``cuts`` times."""
    cuts: int = 0
    delay: float = 0.0
    """Seconds to wait before answering (for timeout tests)."""
    chunk_delay: float = 0.0
    """Seconds to wait after each 64 KiB of body (a slow link)."""
    require_token: str | None = None
    redirect: str | None = None
    json_body: bytes | None = None
    """Alternative body for clients that accept PEP 691 JSON."""
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    content_type: str | None = None


class LocalServer:
    """``with LocalServer() as srv:``; ``srv.url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # -- content ----------------------------------------------------------------------

    def add(self, path: str, resource: Resource) -> str:
        """Serve ``resource`` at ``path``; returns its full URL."""
        self.resources[path] = resource
        return self.url + path

    def add_file(self, path: str, body: bytes, **options: Any) -> str:
        return self.add(path, Resource(body=body, **options))

    def add_pypi_project(
        self, name: str, files: dict[str, bytes], *, json_api: bool = False, **options: Any
    ) -> None:
        """A simple-index page ``/simple/{normalized}/`` listing ``files`` (served under
        ``/files/``) with ``#sha256=`` fragments; with ``json_api`` it also answers PEP 691
        JSON to clients that ask for it. ``options`` apply to every file."""
        normalized = re.sub(r"[-_.]+", "-", name).lower()
        anchors, json_files = [], []
        for filename, body in files.items():
            self.add_file(f"/files/{filename}", body, **options)
            digest = sha256_hex(body)
            href = f"../../files/{filename}#sha256={digest}"
            anchors.append(f'<a href="{html.escape(href)}">{html.escape(filename)}</a><br/>')
            json_files.append(
                {"filename": filename, "url": f"/files/{filename}", "hashes": {"sha256": digest}}
            )
        page = (
            f"<!DOCTYPE html>\n<html><head><title>Links for {name}</title></head><body>\n"
            f"<h1>Links for {name}</h1>\n" + "\n".join(anchors) + "\n</body></html>\n"
        )
        body_json = json.dumps(
            {"meta": {"api-version": "1.0"}, "name": normalized, "files": json_files}
        ).encode()
        self.add(
            f"/simple/{normalized}/",
            Resource(
                body=page.encode(),
                content_type="text/html; charset=utf-8",
                json_body=body_json if json_api else None,
            ),
        )

    def add_hf_file(
        self,
        repo: str,
        filename: str,
        body: bytes,
        *,
        revision: str = "main",
        require_token: str | None = None,
        **options: Any,
    ) -> str:
        """``/{repo}/resolve/{revision}/{filename}`` redirecting to a CDN-like path, as the
        Hub does for LFS files; returns the resolve URL."""
        cdn = f"/cdn/{sha256_hex(body)}"
        self.add(cdn, Resource(body=body, **options))
        return self.add(
            f"/{repo}/resolve/{revision}/{filename}",
            Resource(status=302, redirect=cdn, require_token=require_token),
        )

    def seen(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _record(self, entry: Recorded) -> None:
        with self._lock:
            self.requests.append(entry)


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _make_handler(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            self._status = 0
            self._sent_type: str | None = None
            self._answer(server.resources.get(path), head)

        # recorded when the headers go out, so the record of a redirect always precedes the
        # record of the request it leads to
        def send_response(self, code: int, message: str | None = None) -> None:
            self._status = code
            super().send_response(code, message)

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "content-type":
                self._sent_type = value
            super().send_header(keyword, value)

        def end_headers(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = self.path.split("?", 1)[0]
            server._record(Recorded(self.command, path, headers, self._status, self._sent_type))
            super().end_headers()

        def _answer(self, res: Resource | None, head: bool) -> int:
            if res is None:
                return self._simple(404, b"not found\n")
            if res.delay:
                time.sleep(res.delay)
            token = res.require_token
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                return self._simple(401, b"unauthorized\n")
            if res.redirect is not None:
                self.send_response(res.status if res.status in (301, 302, 307, 308) else 302)
                self.send_header("Location", res.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return res.status
            if res.status != 200:
                return self._simple(res.status, res.body)
            body, ctype = res.body, res.content_type
            if res.json_body is not None and SIMPLE_JSON in self.headers.get("Accept", ""):
                body, ctype = res.json_body, SIMPLE_JSON
            start, status = 0, 200
            wanted = self.headers.get("Range")
            if wanted and res.ranges:
                m = _RANGE.match(wanted.strip())
                if m:
                    start = int(m[1])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return 416
                    end = min(int(m[2]), len(body) - 1) if m[2] else len(body) - 1
                    body = body[start : end + 1]
                    status = 206
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if res.ranges else "none")
            if status == 206:
                self.send_header(
                    "Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(res.body)}"
                )
            for key, value in res.extra_headers.items():
                self.send_header(key, value)
            self.end_headers()
            if head:
                return status
            if res.cut_after is not None and res.cuts > 0 and len(body) > res.cut_after:
                res.cuts -= 1
                self.wfile.write(body[: res.cut_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return status
            if res.chunk_delay:
                for i in range(0, len(body), 65536):
                    self.wfile.write(body[i : i + 65536])
                    time.sleep(res.chunk_delay)
            else:
                self.wfile.write(body)
            return status

        def _simple(self, status: int, body: bytes) -> int:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return status

    return Handler
