"""A real HTTP file server on 127.0.0.1 (``http.server`` in a thread) for the http(s) shard tests.

Serves the files of one folder with ``Range: bytes=N-`` support (206 + Content-Range), an ETag,
and faults on demand: ``drop_after`` bytes into a response the connection is cut (the first
``drops`` responses only), ``no_range`` ignores Range headers (200 with the whole file),
``require`` is a header that must be present (else 401). ``/redirect/PATH`` answers 302 to
``/PATH``, ``/redirect-host/PATH`` 302 to ``http://localhost:PORT/PATH`` (another host). Every request's path and headers are
recorded in ``requests``.
"""
from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    def __init__(self, root: str, drop_after: int | None = None, drops: int = 1, no_range: bool = False,
                 require: tuple[str, str] | None = None):
        self.root, self.drop_after, self.drops_left = root, drop_after, drops
        self.no_range, self.require = no_range, require
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.dropped = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append((self.path, dict(self.headers.items())))
                if server.require and self.headers.get(server.require[0]) != server.require[1]:
                    self.send_error(401)
                    return
                if self.path.startswith(("/redirect/", "/redirect-host/")):
                    # /redirect-host/: to the same server under another host name (localhost)
                    where, _, rest = self.path[1:].partition("/")
                    host = f"http://localhost:{server.port}" if where == "redirect-host" else ""
                    self.send_response(302)
                    self.send_header("Location", f"{host}/{rest}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = os.path.join(server.root, self.path.lstrip("/").split("?")[0])
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    data = f.read()
                etag = '"' + hashlib.md5(data).hexdigest() + '"'
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.no_range:
                    start = int(rng.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "none" if server.no_range else "bytes")
                self.end_headers()
                with server._lock:
                    drop = server.drop_after is not None and server.drops_left > 0 and len(body) > server.drop_after
                    if drop:
                        server.drops_left -= 1
                        server.dropped += 1
                if drop:
                    self.wfile.write(body[:server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)   # cut mid-body
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FileServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
