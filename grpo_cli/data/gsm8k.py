"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168): grade-school word problems, 7,473 train / 1,319 test.

    grpo train data=gsm8k data.path=../shared/data/gsm8k reward=math

Each record has ``question`` and ``answer``; the answer is a worked solution that ends in ``#### N``.
Rows: ``id`` = index in the file, ``question``, ``answer`` = N with thousands separators removed,
``solution`` = the full worked solution. ``data.path`` is a .jsonl file or a directory holding
``<split>.jsonl``; without it the Hugging Face dataset ``data.hub_id`` (``openai/gsm8k``, config
``main``) is read with the ``datasets`` library, when installed.
"""

from __future__ import annotations

from typing import Any

from grpo_cli.data.jsonl import load_hub, load_table, resolve_file

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"


def final_answer(solution: str) -> str:
    """The N after the last ``####`` of a GSM8K solution, commas removed; ValueError when absent."""
    if "####" not in solution:
        raise ValueError("answer has no '#### N' line")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise ValueError("nothing after '####'")
    return answer


def to_row(index: int, record: dict) -> dict:
    solution = record["answer"]
    if not isinstance(record["question"], str) or not isinstance(solution, str):
        raise ValueError("question and answer must be strings")
    return {
        "id": str(index),
        "question": record["question"],
        "answer": final_answer(solution),
        "solution": solution,
    }


def load(cfg: Any, split: str) -> list[dict]:
    """GSM8K rows of ``split`` (train / test) from ``cfg.path`` or the hub."""
    if cfg.path:
        return load_table(resolve_file(cfg.path, split), "data=gsm8k", to_row)
    return load_hub("gsm8k", cfg.hub_id or HUB_ID, cfg.hub_config or HUB_CONFIG, split, to_row)
