"""Prompt sources. Every source yields rows: plain dicts with at least

- ``id``: str, stable problem id (row index for arithmetic and GSM8K, ``unique_id`` for MATH-500,
  ``task_id`` for HumanEval),
- ``question``: str, the problem text that ``data.template`` wraps into the prompt,
- ``answer``: str, the gold final answer (or the reference solution for code),

plus whatever a reward rule needs (HumanEval: ``prompt``, ``test``, ``entry_point``; reasoning-gym:
``task``, ``task_config``, ``metadata``, ``entry``).

``load_rows(cfg, split)`` dispatches on ``data.name``; ``build_prompt`` is the one place a row
becomes prompt text; ``reference`` the one place a row's reference (what a completion is judged
against, written beside it in every per-completion record) is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpo_cli.config import ConfigError
from grpo_cli.data import arithmetic, gsm8k, humaneval, jsonl, math500, reasoning_gym
from grpo_cli.data.split import load_split

Row = dict[str, Any]

# name -> loader(cfg, split) -> list[Row]
SOURCES: dict[str, Callable[[Any, str], list[Row]]] = {
    "arithmetic": arithmetic.load,
    "gsm8k": gsm8k.load,
    "math500": math500.load,
    "humaneval": humaneval.load,
    "jsonl": jsonl.load,
    "reasoning_gym": reasoning_gym.load,
}


def load_rows(cfg: Any, split: str) -> list[Row]:
    """Rows of ``split`` for the data group ``cfg`` (a DataConfig). Raises ConfigError on a bad name."""
    loader = SOURCES.get(cfg.name)
    if loader is None:
        raise ConfigError(
            f"data.name={cfg.name!r} is not a known source; choose one of: {', '.join(sorted(SOURCES))}"
        )
    rows = load_split(cfg, split, loader)  # one file: a disjoint held-out slice (data/split.py)
    if not rows:
        raise ConfigError(f"data={cfg.name} split={split!r} holds no usable rows")
    return rows


def build_prompt(row: Row, template: str) -> str:
    """Prompt text for one row: ``template`` with ``{question}`` filled in (no chat template here)."""
    return template.replace("{question}", row["question"])


def reference(row: Row) -> str:
    """What a completion of ``row`` is judged against, as the records show it (key ``reference``).

    The row's ``answer`` (the gold final answer as its loader normalised it); for a code row (one with
    ``test`` and ``entry_point``: HumanEval) the name of the function its tests check, since the
    canonical solution is not what the tests compare with and the test code is too long for a record.
    """
    if row.get("test") and row.get("entry_point"):
        return str(row["entry_point"])
    return str(row.get("answer", "") or "")
