"""A scripted HTTP JSON endpoint in a thread (port 0, 127.0.0.1): what the judge and remote tests talk to."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the endpoint answers: ``body`` as JSON with ``status``, after ``delay`` seconds."""

    body: Any = None
    status: int = 200
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


Script = Callable[[Seen], Reply]


class FakeEndpoint:
    """``with FakeEndpoint(script) as ep:`` serves ``script(request) -> Reply`` at ``ep.url``; every
    request is recorded in ``ep.seen``. ``script`` may keep state (it is called under a lock, so a
    "fail once, then succeed" script needs no lock of its own); delays run outside the lock."""

    def __init__(self, script: Script):
        self.script = script
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Seen(self.command, self.path, json.loads(raw) if raw else None, dict(self.headers))
                with endpoint._lock:
                    endpoint.seen.append(request)
                    reply = endpoint.script(request)
                time.sleep(reply.delay)
                data = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (its timeout) and closed the socket
                    pass

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, path: str) -> int:
        """Requests seen at ``path`` so far."""
        with self._lock:
            return sum(1 for s in self.seen if s.path == path)

    def __enter__(self) -> FakeEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def dead_url() -> str:
    """The address of a port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
