"""Loopback helpers for the fault campaign, the combination matrix and the tests: a port nothing
listens on, and an HTTP server on 127.0.0.1 that answers every request with one status code."""
from __future__ import annotations

import http.server
import socket
import threading

__all__ = ["free_port", "StatusServer"]


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (a connection to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StatusServer:
    """``with StatusServer(401) as server: server.url``: every GET/POST/HEAD answered with ``status``."""

    def __init__(self, status: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StatusServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
