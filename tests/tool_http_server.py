"""An HTTP server whose endpoints are tools for the registry's tests, on 127.0.0.1 and a
free port. It records every request (method, path, query, headers, body) so a test can
prove what reached it, and what did not.

    POST /weather      JSON back: the city it got and the Authorization header
    GET  /search       JSON back: the query parameters (repeated ones as lists)
    GET  /text         text/plain
    *    /fail         500 with a text body
    *    /hang         answers only when the server stops
    POST /charge       JSON back; the first request waits until ``release`` is set (a call
                       in flight, for the crash tests), later ones answer at once
    GET  /big          5 MiB with a Content-Length
    GET  /big-chunked  5 MiB, chunked (no Content-Length)
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Seen", "ToolHttpServer"]

BIG = 5 * 1024 * 1024


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class ToolHttpServer:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.release = threading.Event()  # /charge's first request waits for it
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def paths(self) -> list[str]:
        with self.lock:
            return [s.path for s in self.seen]

    def last(self, path: str) -> Seen:
        with self.lock:
            return [s for s in self.seen if s.path == path][-1]

    def __enter__(self) -> ToolHttpServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()  # /hang answers now
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler(server: ToolHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
            with server.lock:
                server.seen.append(seen)
            if parts.path == "/weather":
                got = json.loads(body or b"{}")
                auth = self.headers.get("Authorization")
                self._send(200, "application/json", {"city": got.get("city"), "auth": auth})
            elif parts.path == "/search":
                query = {k: v if len(v) > 1 else v[0] for k, v in seen.query.items()}
                self._send(200, "application/json; charset=utf-8", query)
            elif parts.path == "/text":
                self._send(200, "text/plain; charset=utf-8", "plain words")
            elif parts.path == "/fail":
                self._send(500, "text/plain", "the tool broke")
            elif parts.path == "/charge":
                if len([x for x in server.seen if x.path == "/charge"]) == 1:
                    server.release.wait(60)
                got = json.loads(body or b"{}")
                self._send(200, "application/json", {"charged": got.get("amount")})
            elif parts.path == "/hang":
                server.stopping.wait(60)
                self._send(200, "text/plain", "late")
            elif parts.path == "/big":
                self._send(200, "application/octet-stream", b"x" * BIG)
            elif parts.path == "/big-chunked":
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                piece = b"y" * 65536
                try:
                    for _ in range(BIG // len(piece)):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the client stopped reading, as it should
            else:
                self._send(404, "text/plain", "no such tool")

        def _send(self, status: int, content_type: str, body: Any) -> None:
            if isinstance(body, bytes):
                data = body
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):  # a client that stopped reading
                self.wfile.write(data)

    return Handler
