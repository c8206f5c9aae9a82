"""One data file, two splits: a seeded, disjoint held-out slice, so training never evaluates on its own rows.

    grpo train data=jsonl data.path=problems.jsonl                      # 10% held out (data.test_size=0.1)
    grpo train data=jsonl data.path=problems.jsonl data.test_size=200   # 200 rows held out
    grpo train data=gsm8k data.path=train.jsonl data.test_path=test.jsonl   # an explicit held-out file
    grpo train data=jsonl data.path=problems.jsonl data.test_size=0     # every row in both (asked for by name)

Applies to the sources that read a local table (``jsonl``, ``gsm8k``, ``math500``) when ``data.path`` is
one file. A directory with ``<split>.jsonl`` files is used as it is. The slice is drawn with a fixed seed
(not the run's ``seed``), so ``grpo train``, ``grpo sample`` and ``grpo eval`` hold out the same rows;
the training split gets the rest, both in file order. ``data.train_split`` names the training side;
every other split name gets the held-out side.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from grpo_cli.config import ConfigError

log = logging.getLogger("grpo_cli")

SOURCES = ("jsonl", "gsm8k", "math500")
_SPLIT_SEED = 20241114  # fixed: the held-out rows must not move with the run's seed
_announced: set[tuple[str, float, int]] = set()


def held_out_count(test_size: float, n: int, where: str) -> int:
    """Rows to hold out of ``n``: ``test_size`` itself when >= 1, else that fraction (at least 1)."""
    count = int(test_size) if test_size >= 1 else max(1, round(test_size * n))
    if count >= n:
        raise ConfigError(
            f"data.test_size={test_size:g}: holds out {count} of the {n} rows of {where}, leaving none to train on"
        )
    return count


def split_indices(n: int, count: int) -> tuple[list[int], list[int]]:
    """(training, held-out) row indices: ``count`` drawn with the fixed seed, each side in file order."""
    order = random.Random(_SPLIT_SEED).sample(range(n), n)
    return sorted(order[count:]), sorted(order[:count])


# data.test_size=null: a file's held-out fraction, a generated source's held-out problems.
DEFAULT_TEST_FRACTION, DEFAULT_TEST_PROBLEMS = 0.1, 500
# The sources that generate their problems (data.train_size / data.test_size count problems).
GENERATED = ("arithmetic", "reasoning_gym")


def test_size(cfg: Any) -> float:
    """``data.test_size``, its default (null) resolved for the source: problems or a file's fraction."""
    if cfg.test_size is not None:
        return cfg.test_size
    return DEFAULT_TEST_PROBLEMS if cfg.name in GENERATED else DEFAULT_TEST_FRACTION


def load_split(cfg: Any, split: str, loader: Callable[[Any, str], list[dict]]) -> list[dict]:
    """``loader(cfg, split)``, with one file's rows divided into a training and a held-out side."""
    if cfg.name not in SOURCES or not cfg.path:
        return loader(cfg, split)
    is_train = split == cfg.train_split
    if cfg.test_path:
        return loader(cfg if is_train else replace(cfg, path=cfg.test_path), split)
    size = test_size(cfg)
    if not Path(cfg.path).expanduser().is_file() or not size:
        return loader(cfg, split)
    rows = loader(cfg, split)
    count = held_out_count(size, len(rows), f"data.path={cfg.path}")
    train, held_out = split_indices(len(rows), count)
    key = (str(cfg.path), float(size), len(rows))
    if key not in _announced:
        _announced.add(key)
        log.info(
            "data.path=%s is one file: %d rows for training, %d held out (data.test_size=%g; "
            "data.test_path= names a held-out file, data.test_size=0 uses every row for both)",
            cfg.path,
            len(train),
            len(held_out),
            size,
        )
    return [rows[i] for i in (train if is_train else held_out)]
