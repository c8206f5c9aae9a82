"""Synthetic arithmetic: ``Calculate 2 + 2 * 6`` -> ``14``, with +, - and * under normal precedence.

Every expression with up to ``max_operators`` operators over operands 0..``max_operand`` is
enumerated once and shuffled with a fixed seed, so the test split is the same for every run and
disjoint from the train split by construction.
"""

from __future__ import annotations

import itertools
import random
from functools import lru_cache
from typing import Any

from grpo_cli.config import ConfigError
from grpo_cli.data.split import test_size

OPS = ("+", "-", "*")
_SPLIT_SEED = 20240205  # fixed: the held-out set must not move with the run's seed


def evaluate(expr: str) -> int:
    """Value of a space-separated expression of ints and + - * with the usual precedence."""
    tokens = expr.split()
    # Fold products first, then sum the signed terms.
    terms: list[int] = []
    sign = 1
    product = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product *= int(num)
        else:
            terms.append(sign * product)
            sign = 1 if op == "+" else -1
            product = int(num)
    terms.append(sign * product)
    return sum(terms)


@lru_cache(maxsize=8)
def _split(max_operators: int, max_operand: int, held_out: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    exprs = []
    operands = range(max_operand + 1)
    for n_ops in range(1, max_operators + 1):
        for nums in itertools.product(operands, repeat=n_ops + 1):
            for ops in itertools.product(OPS, repeat=n_ops):
                parts = [str(nums[0])]
                for op, num in zip(ops, nums[1:]):
                    parts += [op, str(num)]
                exprs.append(" ".join(parts))
    random.Random(_SPLIT_SEED).shuffle(exprs)
    held_out = min(held_out, len(exprs) // 2)
    return tuple(exprs[held_out:]), tuple(exprs[:held_out])


def make_row(idx: int, expr: str) -> dict[str, Any]:
    return {"id": str(idx), "question": f"Calculate {expr}", "answer": str(evaluate(expr))}


def load(cfg: Any, split: str) -> list[dict[str, Any]]:
    """Rows for ``split`` ("train" or "test"); train is capped at ``cfg.train_size`` expressions, test
    holds ``cfg.test_size``."""
    train, test = _split(cfg.max_operators, cfg.max_operand, int(test_size(cfg)))
    if split == cfg.test_split or split == "test":
        exprs = test
    elif split == cfg.train_split or split == "train":
        exprs = train[: cfg.train_size]
    else:
        raise ConfigError(f"data split {split!r} is not one of: train, test")
    return [make_row(i, e) for i, e in enumerate(exprs)]
