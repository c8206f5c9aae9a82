"""JSON over HTTP for the rules that ask a service for scores (``judge``, ``remote``): bounded retries,
a key read from an environment variable, and a probe that turns a dead endpoint into one line at start.

The standard library's http.client, like ``engines/server/http.py`` (which this layer may not import:
``engines`` sits above ``rewards``); no proxy is used, as there. A request that times out, cannot
connect, or is answered 429 or 5xx is tried again up to ``retries`` times, waiting ``backoff`` seconds,
doubled each time (a busy judge gets a moment); any other error answer (400: a prompt too long, 401: a
wrong key) would fail the same way again and is not retried.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from grpo_cli.config import ConfigError

PROBE_TIMEOUT_S = 5.0  # the start-up probe: a live endpoint answers a listing or an empty batch at once
MAX_BACKOFF_S = 10.0


class EndpointError(RuntimeError):
    """A request that failed; ``retryable`` when another try could succeed (timeout, refused, 429, 5xx)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Outcome:
    """One request after its retries: the decoded answer, or why there is none."""

    answer: Any = None
    error: str | None = None  # None: ``answer`` is the endpoint's decoded JSON
    retries: int = 0  # tries after the first


def auth_headers(api_key_env: str | None, api_key: Any, who: str) -> dict[str, str]:
    """``Authorization: Bearer $<api_key_env>`` (none when ``api_key_env`` is None). A literal key in the
    config is refused: the run's resolved config is saved beside its checkpoints and would carry it."""
    if api_key is not None:
        raise ConfigError(
            f"{who}: api_key is not read from a config (it would be saved with the run); put the key in "
            "an environment variable and name it: api_key_env=MY_KEY_VARIABLE"
        )
    if api_key_env is None:
        return {}
    key = os.environ.get(str(api_key_env), "")
    if not key:
        raise ConfigError(
            f"{who}: api_key_env={api_key_env}: that environment variable is not set or empty "
            "(export it, or api_key_env=null for an endpoint without a key)"
        )
    return {"Authorization": f"Bearer {key}"}


def positive(value: Any, key: str, who: str, allow_zero: bool = False) -> float:
    """``value`` as a number > 0 (>= 0 with ``allow_zero``), else a one-line ConfigError naming ``key``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{who}: {key}={value!r}: must be a number {'>=' if allow_zero else '>'} 0")
    return float(value)


class JsonClient:
    """POST/GET JSON to one base URL with a timeout per try, ``retries`` more tries and a backoff."""

    def __init__(
        self, url: str, timeout: float, retries: int, backoff: float, headers: dict[str, str], who: str
    ):
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{who}: {url!r} is not a URL: expected http://host:port/path or https://...")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"{who}: retries={retries!r}: must be a whole number >= 0")
        self.who = who
        self.url = str(url).rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, int(retries), backoff
        self.headers = {"Content-Type": "application/json", **headers}
        self._parts = parts

    def request(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One try: POST ``body`` as JSON to ``url + path`` (GET when None); the decoded answer.
        Raises EndpointError."""
        timeout = self.timeout if timeout is None else timeout
        kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(self._parts.hostname, self._parts.port, timeout=timeout)
        where = self.url + path
        try:
            data = None if body is None else json.dumps(body, default=str).encode()
            conn.request(
                "GET" if body is None else "POST",
                (self._parts.path.rstrip("/") + path) or "/",
                data,
                self.headers,
            )
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise EndpointError(f"{where} did not answer within {timeout:g} s", True) from None
        except (http.client.HTTPException, OSError) as exc:
            raise EndpointError(f"{where} is not reachable: {exc or type(exc).__name__}", True) from None
        finally:
            conn.close()
        if resp.status >= 400:
            detail = " ".join(raw.decode(errors="replace").split())[:200]
            raise EndpointError(
                f"{where} answered {resp.status}: {detail}", resp.status == 429 or resp.status >= 500
            )
        try:
            return json.loads(raw)
        except ValueError:
            raise EndpointError(
                f"{where} answered something that is not JSON: {raw[:100]!r}", False
            ) from None

    def send(self, path: str, body: Any) -> Outcome:
        """``request`` with the retries; never raises for the endpoint's faults."""
        for attempt in range(self.retries + 1):
            try:
                return Outcome(self.request(path, body), None, attempt)
            except EndpointError as exc:
                if not exc.retryable or attempt == self.retries:
                    return Outcome(None, str(exc), attempt)
            time.sleep(min(self.backoff * 2**attempt, MAX_BACKOFF_S))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns on its last try

    def probe(self, path: str, body: Any) -> Any:
        """One short try at start; a ConfigError of one line naming the URL when nothing answers."""
        try:
            return self.request(path, body, timeout=min(PROBE_TIMEOUT_S, self.timeout))
        except EndpointError as exc:
            raise ConfigError(f"{self.who}: the endpoint does not answer: {exc} (is it running?)") from None


class Workers:
    """The request threads of a rule: started on the first ``map``, stopped by ``close`` (a later
    ``map`` starts them again), so a rule that is built but never called holds no threads."""

    def __init__(self, count: int, name: str):
        self.count, self.name = count, name
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[Any], Outcome], items: Sequence[Any]) -> list[Outcome]:
        """``fn`` over ``items`` with ``count`` in flight at once, results in order."""
        if not items:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix=self.name)
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
