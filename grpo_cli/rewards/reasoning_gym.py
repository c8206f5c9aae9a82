"""reasoning-gym reward: the task's own ``score_answer`` on the completion's answer, partial credit kept.

    grpo train data=reasoning_gym data.task=chain_sum      # data=reasoning_gym brings reward=reasoning_gym

The answer a completion gives (``answer_of``): the last ``<answer>...</answer>`` in it, stripped (the
format reasoning-gym's own prompts ask for; ``tag`` names another tag); a completion without the tag
gives the whole completion, stripped (``untagged=whole``: the data group's template ends in "Answer: ",
so a model that replies with the bare answer is read as it wrote it), or no answer (``untagged=none``).
A completion with no answer is scored by ``score_answer(None, entry)`` like any other (0 for every task
shipped).

The score is ``score_answer(answer, entry)`` of the task that made the row, rebuilt with the row's
``task_config`` (the arguments the data group built it with), in [0, 1]: tasks that grade partial
credit (e.g. ``chain_sum``: the right number inside a longer answer earns len(gold) / len(answer)) keep
it; ``correct`` (accuracy, pass@k) counts only 1.0. The calls run in worker processes with a hard
wall-clock ``timeout`` each (``rewards/pool.py``), since some scorers hand model text to sympy
(``simple_integration``'s ``parse_expr("9**9**9**9")`` never returns): a call past its timeout, one
that raises and a crashed worker score 0 and are counted (``metrics()``: ``timeouts``, ``errors``).
A row that no reasoning-gym task made (no ``task``/``entry``) cannot be judged: None.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from typing import Any
from weakref import finalize as weakref_finalize

from grpo_cli.config import ConfigError
from grpo_cli.rewards.pool import Check, CheckPool

log = logging.getLogger("grpo_cli")

EXTRA = "reward=reasoning_gym needs the reasoning-gym extra: pip install 'grpo-cli[reasoning-gym]'"
UNTAGGED = ("whole", "none")
_DATASETS: dict[str, Any] = {}  # in a worker: (task, task_config) -> the task's dataset, built once


def score_entry(task: str, task_config: dict[str, Any], answer: str | None, entry: dict[str, Any]) -> float:
    """``score_answer(answer, entry)`` of ``task`` built with ``task_config``, in the calling process."""
    import reasoning_gym

    key = json.dumps([task, task_config], sort_keys=True, default=str)
    dataset = _DATASETS.get(key)
    if dataset is None:
        if len(_DATASETS) > 64:
            _DATASETS.clear()
        dataset = _DATASETS[key] = reasoning_gym.create_dataset(task, **task_config)
    return float(dataset.score_answer(answer, entry))


def _import_reasoning_gym() -> None:
    import reasoning_gym  # noqa: F401 - a worker's start: every task module is imported (~1 s)


class ReasoningGymReward:
    """Reward rule: the row's task's ``score_answer`` on the completion's answer (see the module).

    Args:
        tag: the answer is the last ``<tag>...</tag>``.
        untagged: without the tag, ``whole`` (the stripped completion) or ``none`` (no answer).
        timeout: hard wall-clock limit in seconds for one ``score_answer`` call.
        workers: scorer processes (started on the first call).
        memory_mb: address-space limit of each worker (0: none).
        check: what the workers run per completion (tests swap in one that misbehaves).
    """

    def __init__(
        self,
        tag: str = "answer",
        untagged: str = "whole",
        timeout: float = 5.0,
        workers: int = 2,
        memory_mb: int = 4096,
        check: Check = score_entry,
    ):
        if importlib.util.find_spec("reasoning_gym") is None:
            raise ConfigError(EXTRA)
        if untagged not in UNTAGGED:
            raise ConfigError(f"reward untagged={untagged!r}: choose one of: {', '.join(UNTAGGED)}")
        if not re.fullmatch(r"[A-Za-z_][\w-]*", tag or ""):
            raise ConfigError(f"reward tag={tag!r}: a tag name such as answer")
        self.tag, self.untagged = tag, untagged
        self._tagged = re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL)
        self._pool = CheckPool(
            workers, timeout, memory_mb, check=check, prepare=_import_reasoning_gym, name="reasoning-gym"
        )
        self._last: dict[str, float] = {}
        self._warned: set[str] = set()
        weakref_finalize(self, self._pool.close)

    def answer_of(self, text: str) -> str | None:
        """The answer ``text`` gives: its last tagged answer, else (``untagged=whole``) itself; stripped."""
        tagged = self._tagged.findall(text)
        answer = tagged[-1] if tagged else (text if self.untagged == "whole" else None)
        answer = answer.strip() if answer is not None else None
        return answer or None

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Scores [N] in [0, 1] (None for rows no reasoning-gym task made)."""
        scores: list[float | None] = [None] * len(completions)
        where, tasks = [], []
        for i, (text, row) in enumerate(zip(completions, rows)):
            if "task" in row and "entry" in row:
                where.append(i)
                tasks.append((row["task"], row.get("task_config") or {}, self.answer_of(text), row["entry"]))
        counts = {"timeouts": 0.0, "errors": 0.0}
        for i, (status, score) in zip(where, self._pool.run(tasks) if tasks else []):
            scores[i] = score
            if status != "ok":
                counts["timeouts" if status == "timeout" else "errors"] += 1
                self._warn_once(status, rows[i].get("task"))
        judged = [s for s in scores if s is not None]
        no_answer = sum(1 for t in tasks if t[2] is None)
        self._last = {
            **counts,
            "no_answer": float(no_answer),
            "partial": float(sum(0 < s < 1 for s in judged)),
        }
        return scores

    def metrics(self) -> dict[str, float]:
        """Counts of the last call: ``timeouts``, ``errors`` (both scored 0), ``no_answer``, ``partial``
        (scores strictly between 0 and 1)."""
        return dict(self._last)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        self._pool.close()

    def _warn_once(self, status: str, task: str | None) -> None:
        if status not in self._warned:
            self._warned.add(status)
            what = f"ran past {self._pool.timeout:g} s" if status == "timeout" else "raised or crashed"
            log.warning(
                "reasoning-gym score_answer of %s %s; scored 0 and counted in reward/<rule>/%s (warned once)",
                task,
                what,
                "timeouts" if status == "timeout" else "errors",
            )
