"""LLM-judge reward: another model, behind any OpenAI-compatible endpoint, grades each completion.

    grpo serve --model Qwen/Qwen2.5-7B-Instruct --port 8000 &     # or any /v1 endpoint (vLLM, a gateway, ...)
    grpo train reward=judge data=gsm8k model=qwen

Each completion becomes one chat request, ``POST {base_url}/chat/completions`` with ``model``,
``messages`` (an optional ``system`` message, then the user message ``template`` with ``{question}``,
``{completion}`` and ``{reference}`` filled in), ``max_tokens``, ``temperature`` and any
``extra_body`` fields; the answer's
``choices[0].message.content`` is read by ``parser``:

- ``number``: the first number in the answer (so ask for the number first, or alone: "8/10" reads 8);
- ``yesno``: the first word "yes" (1.0) or "no" (0.0), in any case;
- ``json``: the answer (or the first ``{...}`` in it) as JSON, its ``field``, a number (true/false: 1/0).

A number (``number``, ``json``) is mapped linearly from ``[low, high]`` to ``[0, 1]`` so that weights
mean the same as for the 0/1 rules; one outside the range did not follow the instructions and does not
parse; ``low=null high=null`` keeps the raw number. ``{reference}`` is the row's ``answer``, the gold
answer as the data group normalised it (``grpo_cli.data.reference`` gives a code row's entry point
instead, no use to a judge; ``data`` and ``rewards`` do not import each other); a template that uses it
cannot judge a row without one (None, counted in ``no_reference``).

An answer that does not parse, and a request that still fails after its ``retries`` (``rewards/http.py``:
timeouts, refused connections, 429 and 5xx are tried again), score None ("cannot be judged": left out
of the loss) and are counted in ``failures``, warned about once. At construction the endpoint is probed
(``GET {base_url}/models``): a dead judge is one line before any model loads, not a run of Nones.

The answers are cached on disk (sqlite3, ``cache``; default ``$GRPO_HOME/judge_cache.sqlite``) under a
hash of everything sent that decides the answer: ``model``, ``messages``, ``max_tokens``,
``temperature`` and ``extra_body`` (not ``base_url``: the same model behind another port is the same judge; not ``parser``:
the raw answer is stored, so a new parser reads old answers). A resumed run replays its steps' completions
and an eval of the same texts asks nothing twice. With ``temperature > 0`` the cache keeps one sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sqlite3
import string
import threading
from pathlib import Path
from typing import Any
from weakref import finalize as weakref_finalize

from grpo_cli.config import ConfigError, grpo_home
from grpo_cli.rewards.http import JsonClient, Outcome, Workers, auth_headers, positive

log = logging.getLogger("grpo_cli")

WHO = "reward judge (JudgeReward)"
FIELDS = ("question", "completion", "reference")
PARSERS = ("number", "yesno", "json")
DEFAULT_URL = "http://127.0.0.1:8000/v1"  # what `grpo serve --port 8000` serves
DEFAULT_TEMPLATE = (
    "Grade the answer to a question against the reference answer.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{completion}\n\n"
    "How correct is the answer, from 0 (wrong) to 10 (fully correct)? Reply with the number only."
)

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_YESNO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def template_fields(template: str) -> set[str]:
    """The ``{fields}`` ``template`` uses; ConfigError for any but question, completion, reference."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{WHO}: template: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"{WHO}: template uses {{{', '.join(unknown)}}}; it may use {{question}}, {{completion}}, "
            "{reference} (write {{ and }} for literal braces)"
        )
    return used


def parse_answer(text: str, parser: str, field: str | None = None) -> float | None:
    """The raw value the judge's answer ``text`` gives under ``parser`` (module docstring), or None."""
    if parser == "yesno":
        found = _YESNO.search(text)
        return None if found is None else float(found.group(1).lower() == "yes")
    if parser == "number":
        found = _NUMBER.search(text)
        return None if found is None else float(found.group(0))
    value = _json_object(text)
    value = value.get(field) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # {"score": "7"}: a judge that quotes its number still said it
        found = _NUMBER.fullmatch(value.strip())
        return None if found is None else float(found.group(0))
    return float(value) if isinstance(value, (int, float)) else None


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    start = text.find("{")  # a fenced block or a sentence around the object
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        return None


class AnswerCache:
    """Judge answers by request hash in one sqlite3 file; safe across threads and processes (DDP ranks
    share it: sqlite's file lock, a generous busy timeout). The connection opens on first use, so a
    closed cache opens again when used again."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)"
            )
            self._db.commit()
        return self._db

    def get(self, keys: list[str]) -> dict[str, str]:
        """The stored answers of those ``keys`` that have one."""
        found: dict[str, str] = {}
        with self._lock:
            db = self._connect()
            for i in range(0, len(keys), 500):  # sqlite's limit on ? parameters in one statement
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk))
        return found

    def put(self, items: dict[str, str]) -> None:
        if not items:
            return
        with self._lock:
            db = self._connect()
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", items.items())
            db.commit()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class JudgeReward:
    """Reward rule: an LLM judge's grade of each completion (see the module).

    Args:
        base_url: the OpenAI-compatible API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the judge model's name; None: the one model the endpoint lists (``grpo serve``'s).
        api_key_env: name of the environment variable holding the key (sent as ``Authorization: Bearer``);
            None: no key. ``api_key`` itself is refused.
        template: the user message, with ``{question}``, ``{completion}``, ``{reference}``.
        system: a system message before it (None: none).
        parser: ``number``, ``yesno`` or ``json``; ``field``: the JSON key (``json``).
        low, high: a number's range, mapped to [0, 1]; both None: the raw number.
        max_tokens, temperature: sampling of the judge's answer.
        extra_body: more fields of each request, as the server takes them (vLLM: ``chat_template``,
            ``chat_template_kwargs``, ``guided_choice``, ...); part of the cache key.
        concurrency: requests in flight at once (threads).
        timeout: seconds per request; retries: more tries of a failed one; backoff: seconds before the
            first retry, doubled each time.
        cache: the sqlite file of answers; ``auto``: ``$GRPO_HOME/judge_cache.sqlite``; None: no cache.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        model: str | None = None,
        api_key_env: str | None = None,
        template: str = DEFAULT_TEMPLATE,
        system: str | None = None,
        parser: str = "number",
        field: str | None = "score",
        low: float | None = 0.0,
        high: float | None = 10.0,
        max_tokens: int = 16,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        cache: str | None = "auto",
        api_key: Any = None,
    ):
        headers = auth_headers(api_key_env, api_key, WHO)
        if parser not in PARSERS:
            raise ConfigError(f"{WHO}: parser={parser!r}: choose one of: {', '.join(PARSERS)}")
        if parser == "json" and not field:
            raise ConfigError(f"{WHO}: parser=json needs field= (the key holding the score)")
        if (low is None) != (high is None) or (low is not None and not high > low):
            raise ConfigError(f"{WHO}: low={low} high={high}: need low < high, or both null (raw numbers)")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ConfigError(f"{WHO}: extra_body={extra_body!r}: a mapping of request fields, or null")
        self.extra_body = dict(extra_body or {})
        self.fields = template_fields(str(template))
        self.template, self.system, self.parser, self.field = str(template), system, parser, field
        self.low, self.high = low, high
        self.max_tokens, self.temperature = int(positive(max_tokens, "max_tokens", WHO)), temperature
        self.concurrency = int(positive(concurrency, "concurrency", WHO))
        backoff = positive(backoff, "backoff", WHO, allow_zero=True)
        self.client = JsonClient(base_url, positive(timeout, "timeout", WHO), retries, backoff, headers, WHO)
        self.model = self._probe(model)
        self.cache = None if cache is None else AnswerCache(self._cache_path(cache))
        self.workers = Workers(self.concurrency, "grpo-judge")
        self._last: dict[str, float] = {}
        self._warned = False
        weakref_finalize(self, JudgeReward._shut, self.workers, self.cache)

    def _probe(self, model: str | None) -> str:
        """The model to ask, after one short ``GET /models`` that proves the endpoint answers."""
        listing = self.client.probe("/models", None)
        data = listing.get("data") if isinstance(listing, dict) else None
        served = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if model is None:
            if len(served) != 1:
                raise ConfigError(
                    f"{WHO}: model=null needs an endpoint serving one model; {self.client.url}/models "
                    f"lists {served or 'none'}: set model="
                )
            return str(served[0])
        if served and model not in served:  # a gateway may route names it does not list: say, not refuse
            log.warning("%s: model %r is not in %s/models (%s)", WHO, model, self.client.url, served[:10])
        return str(model)

    @staticmethod
    def _cache_path(cache: str) -> Path:
        return grpo_home() / "judge_cache.sqlite" if cache == "auto" else Path(cache).expanduser()

    def request_body(self, completion: str, row: dict) -> dict[str, Any] | None:
        """The chat request for one completion; None when the template needs a reference the row lacks."""
        reference = str(row.get("answer", "") or "")
        if "reference" in self.fields and not reference:
            return None
        values = {"question": str(row.get("question", "")), "completion": completion, "reference": reference}
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.template.format(**values)})
        return {
            **self.extra_body,
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def score(self, answer: str) -> float | None:
        """A judge's answer -> reward: parsed, then mapped from [low, high] to [0, 1]; None: unreadable."""
        value = parse_answer(answer, self.parser, self.field)
        if value is None or not math.isfinite(value):
            return None
        if self.parser == "yesno" or self.low is None or self.high is None:
            return value
        if not self.low <= value <= self.high:
            return None
        return (value - self.low) / (self.high - self.low)

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Scores [N] in [0, 1] (raw numbers with low=high=null); None where nothing usable came back."""
        bodies = [self.request_body(c, r) for c, r in zip(completions, rows)]
        keys = [
            None if b is None else hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest()
            for b in bodies
        ]
        answers: dict[str, str] = self.cache.get([k for k in keys if k]) if self.cache is not None else {}
        hits = sum(1 for k in keys if k and k in answers)
        todo = [i for i, k in enumerate(keys) if k and k not in answers]
        outcomes = self._ask([bodies[i] for i in todo])
        fresh: dict[str, str] = {}
        errors: list[str] = []
        for i, outcome in zip(todo, outcomes):
            content = _content(outcome)
            if content is None:
                errors.append(
                    outcome.error or f"no choices[0].message.content in {str(outcome.answer)[:100]}"
                )
            else:
                fresh[keys[i]] = content
        if self.cache is not None:
            self.cache.put(fresh)
        answers.update(fresh)
        scores = [None if k is None or k not in answers else self.score(answers[k]) for k in keys]
        unparsed = sum(1 for k, s in zip(keys, scores) if k in answers and s is None)
        self._last = {
            "failures": float(len(errors) + unparsed),
            "unparsed": float(unparsed),
            "no_reference": float(sum(k is None for k in keys)),
            "requests": float(len(todo)),
            "retries": float(sum(o.retries for o in outcomes)),
            "cache_hits": float(hits),
        }
        self._warn_once(errors, unparsed, answers, keys, scores)
        return scores

    def _ask(self, bodies: list[dict]) -> list[Outcome]:
        return self.workers.map(lambda b: self.client.send("/chat/completions", b), bodies)

    def _warn_once(self, errors: list[str], unparsed: int, answers: dict, keys: list, scores: list) -> None:
        if self._warned or not (errors or unparsed):
            return
        self._warned = True
        if errors:
            why = errors[0]
        else:
            why = "an answer that does not parse: " + next(
                repr(answers[k][:80]) for k, s in zip(keys, scores) if k in answers and s is None
            )
        log.warning(
            "%s: %d of %d completions got no usable grade (e.g. %s); they score None, counted in "
            "reward/<rule>/failures (warned once)",
            WHO,
            len(errors) + unparsed,
            len(keys),
            why,
        )

    def metrics(self) -> dict[str, float]:
        """Counts of the last call: ``failures`` (no usable grade: failed requests + ``unparsed``
        answers), ``no_reference``, ``requests`` (completions sent, each once), ``retries`` (tries after
        a first), ``cache_hits`` (completions answered from the cache)."""
        return dict(self._last)

    def close(self) -> None:
        """Stop the request threads and close the cache file (a later call opens both again)."""
        JudgeReward._shut(self.workers, self.cache)

    @staticmethod
    def _shut(workers: Workers, cache: AnswerCache | None) -> None:
        # Static, on the parts: weakref.finalize must not hold the rule itself.
        workers.close()
        if cache is not None:
            cache.close()


def _content(outcome: Outcome) -> str | None:
    """``choices[0].message.content`` of an OpenAI chat answer; None when the request failed or the
    answer has another shape."""
    if outcome.error is not None:
        return None
    try:
        content = outcome.answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
