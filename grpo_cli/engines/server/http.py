"""A small JSON-over-HTTP client for one vLLM server (the standard library's urllib: no new dependency).

Every call has a timeout (``rollout.server_timeout``); a server that does not answer in time, refuses
the connection or answers an error raises ``ServerError`` naming the URL and what failed, never a
hang.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ServerError(RuntimeError):
    """A generation server that cannot be reached, timed out, or answered an error."""


class Server:
    def __init__(self, url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"Server({self.url})"

    def call(self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        """POST ``body`` as JSON to ``path`` (GET when ``body`` is None); the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST")
        req.add_header("Content-Type", "application/json")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise ServerError(f"{self.url}{path} answered {exc.code}: {detail}") from None
        except TimeoutError:
            raise ServerError(f"{self.url}{path} did not answer within {timeout:g} s") from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"{self.url}{path} is not reachable: {reason}") from None
        return json.loads(raw) if raw.strip() else None

    def rpc(self, method: str, spec: dict[str, Any], timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Run the worker extension's ``method`` on every worker of the server (``/collective_rpc``);
        one decoded answer per worker."""
        body = {"method": method, "args": [json.dumps(spec)]}
        if timeout_s is not None:
            body["timeout"] = timeout_s
        answer = self.call("/collective_rpc", body, timeout_s=timeout_s)
        return [json.loads(r) for r in (answer or {}).get("results", [])]

    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"

    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


def reachable(url: str, timeout_s: float = 3.0) -> str | None:
    """None when ``url`` answers ``/health``; else why not, in a few words."""
    try:
        Server(url, timeout_s).call("/health")
    except ServerError as exc:
        return str(exc)
    return None


def local_address(server: Server) -> str:
    """The address of this machine that ``server`` would see us by (the route to it; no packet sent)."""
    host = server.host()
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, server.port()))
        return s.getsockname()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
