"""MATH-500 (Lightman et al. 2023, arXiv 2305.20050): 500 competition problems from the MATH test set.

    grpo eval data=math500 data.path=../shared/data/math500 reward=math model=qwen-math-1.5b

Each record has ``problem``, ``solution``, ``answer`` (LaTeX, e.g. ``\\frac{14}{3}``) and
``unique_id`` (plus ``subject``, ``level``, kept on the row). Rows: ``id`` = unique_id,
``question`` = problem, ``answer``, ``solution``. There is only a test split. ``data.path`` is a
.jsonl file or a directory holding ``test.jsonl``; without it the Hugging Face dataset
``data.hub_id`` (``HuggingFaceH4/MATH-500``) is read with the ``datasets`` library, when installed.
"""

from __future__ import annotations

from typing import Any

from grpo_cli.data.jsonl import load_hub, load_table, resolve_file

HUB_ID = "HuggingFaceH4/MATH-500"


def to_row(index: int, record: dict) -> dict:
    row = {k: v for k, v in record.items() if k not in ("problem", "unique_id")}
    row.update(
        id=str(record["unique_id"]),
        question=record["problem"],
        answer=str(record["answer"]),
        solution=record["solution"],
    )
    if not isinstance(row["question"], str) or not row["answer"].strip():
        raise ValueError("problem must be a string and answer non-empty")
    return row


def load(cfg: Any, split: str) -> list[dict]:
    """MATH-500 rows (split ``test``) from ``cfg.path`` or the hub."""
    if cfg.path:
        return load_table(resolve_file(cfg.path, split), "data=math500", to_row)
    return load_hub("math500", cfg.hub_id or HUB_ID, cfg.hub_config, split, to_row)
