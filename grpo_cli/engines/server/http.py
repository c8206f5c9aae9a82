"""A small JSON-over-HTTP client for one vLLM server (the standard library's http.client: no new
dependency), and the watch that finds a dead or hung server in seconds.

Every call has a timeout (``rollout.request_timeout`` for a generation request, ``rollout.sync_timeout``
for a weight sync); a server that does not answer in time, refuses the connection or answers an error
raises ``ServerError`` naming the URL and what failed, never a hang. A long call is not left to its
timeout alone: ``wait`` probes every server's ``/health`` beside it (every ``PROBE_EVERY_S``, each
probe ``PROBE_TIMEOUT_S``), and a server that fails ``PROBE_MISSES`` probes in a row (killed: refused at
once; stopped or hung: no answer) ends the wait with its URL. The calls still in flight are then
aborted (their sockets shut), so no thread stays blocked in a read and the process can exit.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as wait_futures
from typing import Any

SERVER_FAILED_EXIT = 75  # EX_TEMPFAIL of sysexits.h: start the server again and resume
PROBE_EVERY_S = 2.0
PROBE_TIMEOUT_S = 5.0
PROBE_MISSES = 2  # one slow answer on a loaded machine is not a dead server; two in a row are


class ServerError(RuntimeError):
    """A generation server that cannot be reached, timed out, or answered an error."""


class Server:
    def __init__(self, url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        parts = urllib.parse.urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._open: set[http.client.HTTPConnection] = set()  # calls in flight (``abort`` shuts them)
        self._lock = threading.Lock()
        self._aborted: str | None = None  # why ``abort`` was called: later calls fail at once

    def __repr__(self) -> str:
        return f"Server({self.url})"

    def call(self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        """POST ``body`` as JSON to ``path`` (GET when ``body`` is None); the decoded JSON answer."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = kind(self.host(), self.port(), timeout=timeout)
        with self._lock:  # with ``abort``'s: a call either sees the abort or is shut by it
            if self._aborted:
                raise ServerError(f"{self.url}{path} not called: {self._aborted}")
            self._open.add(conn)
        try:
            conn.connect()
            with self._lock:  # an abort while connecting found no socket to shut: see it here
                if self._aborted:
                    raise ServerError(f"{self.url}{path} abandoned: {self._aborted}")
            data = None if body is None else json.dumps(body).encode()
            base = urllib.parse.urlsplit(self.url).path
            conn.request(
                "GET" if body is None else "POST", base + path, data, {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status >= 400:
                detail = raw.decode(errors="replace")[:300]
                raise ServerError(f"{self.url}{path} answered {resp.status}: {' '.join(detail.split())}")
        except TimeoutError:
            raise ServerError(f"{self.url}{path} did not answer within {timeout:g} s") from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc or type(exc).__name__
            raise ServerError(f"{self.url}{path} is not reachable: {reason}") from None
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()
        return json.loads(raw) if raw.strip() else None

    def rpc(self, method: str, spec: dict[str, Any], timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Run the worker extension's ``method`` on every worker of the server (``/collective_rpc``);
        one decoded answer per worker."""
        body = {"method": method, "args": [json.dumps(spec)]}
        if timeout_s is not None:
            body["timeout"] = timeout_s
        answer = self.call("/collective_rpc", body, timeout_s=timeout_s)
        return [json.loads(r) for r in (answer or {}).get("results", [])]

    def probe(self) -> str | None:
        """None when ``/health`` answers within ``PROBE_TIMEOUT_S``; else why not."""
        try:
            self.call("/health", timeout_s=PROBE_TIMEOUT_S)
        except ServerError as exc:
            return str(exc)
        return None

    def abort(self, why: str = "aborted after a server failed") -> None:
        """Shut the sockets of the calls in flight (each fails at once with ``ServerError``) and fail
        every later call: the engine is not used after a fault (the run stops and is resumed)."""
        with self._lock:
            self._aborted = why
            conns = list(self._open)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"

    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


def wait(futures: Sequence[Future], servers: Sequence[Server], what: str) -> None:
    """Wait for ``futures`` (calls to ``servers``, or work that needs them) while probing every
    server's ``/health``; the first failure raises, after aborting every call still in flight: a
    ``ServerError`` naming the server and ``what`` it was doing where one is dead or hung (a failed
    collective is blamed on the server that no longer answers), else the future's own error."""
    misses = [0] * len(servers)
    try:
        while True:
            done, pending = wait_futures(futures, timeout=PROBE_EVERY_S, return_when=FIRST_EXCEPTION)
            for f in done:
                if (exc := f.exception()) is not None:
                    if not isinstance(exc, ServerError):  # a collective's error: name the server behind it
                        dead = next(((s, why) for s in servers if (why := s.probe())), None)
                        if dead:
                            raise ServerError(f"{dead[0].url} failed during {what}: {dead[1]}") from exc
                    raise exc
            if not pending:
                return
            for i, s in enumerate(servers):
                why = s.probe()
                misses[i] = misses[i] + 1 if why else 0
                if misses[i] >= PROBE_MISSES:
                    raise ServerError(f"{s.url} stopped answering during {what}: {why}")
    except BaseException:
        for s in servers:
            s.abort()
        for f in futures:
            f.cancel()
        raise


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


def daemon_call(fn: Any, *args: Any) -> Future:
    """``fn(*args)`` on a daemon thread, as a Future: a call that may block in a collective past a
    failure (a peer stopped mid-broadcast) must not keep the process from exiting."""
    future: Future = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True, name="grpo-server-call").start()
    return future
