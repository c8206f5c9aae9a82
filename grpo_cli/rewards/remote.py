"""Remote reward: completions posted in batches to the user's own HTTP scoring service.

    grpo train reward=remote reward.rules.0.url=http://scorer:8080/score

The shape, one POST per batch of at most ``batch_size`` completions (JSON both ways)::

    POST {url}
    {"items": [{"id": 0, "question": "...", "completion": "...", "reference": "..." | null,
                "row": {...the whole dataset row...}}, ...]}
    -> 200 {"scores": [0.5, null, ...]}

``id`` is the completion's place in the rule's call (0..N-1; a row's G completions share ``row``, so
its ``row.id`` is not unique), ``reference`` the row's ``answer`` (null without one: see ``judge.py`` for
why not ``grpo_cli.data.reference``). ``scores`` has one entry per item, in order: a number, or null for
"cannot be judged" (left out of the loss like any rule's None, counted by the rewarder in
``reward/<name>/unjudged``). Values of the row that are not JSON are sent as their ``str``.

A batch that still fails after its ``retries`` (``rewards/http.py``: timeouts, refused connections, 429
and 5xx are tried again) scores None for all its items; an answer with the wrong number of scores, or
an entry that is not a number or null (a string, true, NaN), scores None for what it covers. All of these
are counted in ``failures`` and warned about once. At construction the service is probed with an empty
batch, ``{"items": []}``, which must answer ``{"scores": []}``: a dead or misbehaving service is one line
before any model loads.
"""

from __future__ import annotations

import logging
import math
from typing import Any
from weakref import finalize as weakref_finalize

from grpo_cli.config import ConfigError
from grpo_cli.rewards.http import JsonClient, Outcome, Workers, auth_headers, positive

log = logging.getLogger("grpo_cli")

WHO = "reward remote (RemoteReward)"


def read_scores(outcome: Outcome, n: int) -> tuple[list[float | None], int, str | None]:
    """A batch of ``n`` items' scores from the service's answer, the number that failed, and why."""
    if outcome.error is not None:
        return [None] * n, n, outcome.error
    scores = outcome.answer.get("scores") if isinstance(outcome.answer, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        got = f"{len(scores)} scores" if isinstance(scores, list) else repr(outcome.answer)[:100]
        return [None] * n, n, f"expected {{'scores': [...]}} with {n} entries, got {got}"
    out: list[float | None] = []
    bad: list[Any] = []
    for s in scores:
        number = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
        if s is not None and not number:
            bad.append(s)
        out.append(float(s) if number else None)
    return out, len(bad), (f"scores that are not numbers or null: {bad[:3]!r}" if bad else None)


class RemoteReward:
    """Reward rule: scores from the user's HTTP service (the JSON shape: the module docstring).

    Args:
        url: the service's scoring URL (POST).
        batch_size: items per POST; concurrency: POSTs in flight at once.
        timeout: seconds per POST; retries: more tries of a failed one; backoff: seconds before the
            first retry, doubled each time.
        api_key_env: name of the environment variable holding a key (``Authorization: Bearer``); None:
            no key. ``api_key`` itself is refused.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8001/score",
        batch_size: int = 64,
        concurrency: int = 4,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        api_key_env: str | None = None,
        api_key: Any = None,
    ):
        headers = auth_headers(api_key_env, api_key, WHO)
        self.batch_size = int(positive(batch_size, "batch_size", WHO))
        self.concurrency = int(positive(concurrency, "concurrency", WHO))
        backoff = positive(backoff, "backoff", WHO, allow_zero=True)
        self.client = JsonClient(url, positive(timeout, "timeout", WHO), retries, backoff, headers, WHO)
        answer = self.client.probe("", {"items": []})
        if not (isinstance(answer, dict) and answer.get("scores") == []):
            raise ConfigError(
                f'{WHO}: {self.client.url} answered {{"items": []}} with {str(answer)[:100]!r}; '
                'expected {"scores": []} (the shape: grpo_cli/rewards/remote.py)'
            )
        self.workers = Workers(self.concurrency, "grpo-remote")
        self._last: dict[str, float] = {}
        self._warned = False
        weakref_finalize(self, self.workers.close)  # the threads stop with the rule

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Scores [N] as the service gave them; None where it gave null or nothing usable."""
        items = [
            {
                "id": i,
                "question": row.get("question"),
                "completion": c,
                "reference": row.get("answer") or None,
                "row": row,
            }
            for i, (c, row) in enumerate(zip(completions, rows))
        ]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        outcomes = self._post(batches)
        scores: list[float | None] = []
        failures, retries, why = 0, 0, None
        for batch, outcome in zip(batches, outcomes):
            part, failed, reason = read_scores(outcome, len(batch))
            scores += part
            failures, retries = failures + failed, retries + outcome.retries
            why = why or reason
        self._last = {"failures": float(failures), "requests": float(len(batches)), "retries": float(retries)}
        if why and not self._warned:
            self._warned = True
            log.warning(
                "%s: %d of %d completions got no usable score (e.g. %s); they score None, counted in "
                "reward/<rule>/failures (warned once)",
                WHO,
                failures,
                len(items),
                why,
            )
        return scores

    def _post(self, batches: list[list[dict]]) -> list[Outcome]:
        return self.workers.map(lambda b: self.client.send("", {"items": b}), batches)

    def metrics(self) -> dict[str, float]:
        """Counts of the last call: ``failures`` (completions without a usable score: their batch failed,
        or its answer was malformed), ``requests`` (batches posted, each once), ``retries``."""
        return dict(self._last)

    def close(self) -> None:
        """Stop the request threads (a later call starts new ones)."""
        self.workers.close()
