"""An HTTP proxy in front of the real Rucio server that a test can make misbehave: answer every request with a
503 (a load balancer in front of a dead server), or answer a bare 500, with no Rucio exception headers, to any
request whose body mentions a poison string (a request the server chokes on while it is healthy)."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


def forward(upstream: tuple[str, int], method: str, path: str, headers: Iterable[tuple[str, str]],
            body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """One request to the real server: (status, headers, body), or None when it cannot be reached."""
    conn = http.client.HTTPConnection(*upstream, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers={k: v for k, v in headers if k.lower() not in HOP})
        reply = conn.getresponse()
        return reply.status, reply.getheaders(), reply.read()
    except OSError:
        return None
    finally:
        conn.close()


class RucioProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.unavailable = False  # every request: 503
        self.poison: str | None = None  # requests whose body contains it: bare 500
        self.refused = 0
        self.slow: tuple[str, str, float] | None = None  # (method, path, seconds): such requests wait first
        self.held = threading.Event()  # set while a slow request is being held
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.unavailable:
                    return self._answer(503, b"<html>503 Service Unavailable</html>")
                slow = proxy.slow
                if slow and self.command == slow[0] and self.path.split("?")[0] == slow[1]:
                    proxy.held.set()
                    time.sleep(slow[2])
                if proxy.poison and proxy.poison.encode() in body:
                    proxy.refused += 1
                    return self._answer(500, b"Internal Server Error")
                answer = forward(proxy.upstream, self.command, self.path, self.headers.items(), body)
                if answer is None:  # the server is down: what a load balancer in front of it answers
                    return self._answer(502, b"<html>502 Bad Gateway</html>")
                self._answer(answer[0], answer[2], [(k, v) for k, v in answer[1] if k.lower() not in HOP])

            def _answer(self, code: int, text: bytes, headers: Iterable[tuple[str, str]] = (
                    ("Content-Type", "text/html"),)) -> None:
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            do_GET = do_POST = do_PUT = do_DELETE = _relay  # noqa: N815 - http.server's naming

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hung up mid-request (a killed consumer): nothing to report

        self.server = Server((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client_config(self, original: Path, dest: Path) -> Path:
        """A copy of a rucio-clients config that reaches the server through this proxy (for a CLI subprocess)."""
        dest.write_text(original.read_text().replace(f"http://{self.upstream[0]}:{self.upstream[1]}", self.url))
        return dest

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
