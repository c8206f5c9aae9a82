"""grpo_cli.metrics against slow references: brute force over subsets, exact fractions, hand-built votes."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from grpo_cli.commands.eval_metrics import (
    bootstrap_ci,
    maj_at_k,
    majority_index,
    paired_bootstrap_ci,
    paired_delta,
    pass_at_k,
    summarize,
)


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """The definition: the fraction of size-k subsets of the n completions holding a correct one."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_on_random_cases():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        correct = [rng.random() < rng.random() for _ in range(n)]
        k = rng.randint(1, n)
        assert pass_at_k(n, sum(correct), k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_is_exact_and_finite_up_to_n_1000():
    # C(1000, 500) ~ 2.7e299: the textbook formula with floats overflows or loses everything here.
    worst = 0.0
    for n, c, k in [
        (1000, 0, 1),
        (1000, 1, 1),
        (1000, 1, 999),
        (1000, 500, 500),
        (1000, 400, 600),
        (1000, 3, 10),
        (1000, 999, 1000),
        (1000, 1000, 1),
        (1000, 10, 500),
        (777, 5, 100),
    ]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = pass_at_k(n, c, k)
        assert math.isfinite(got) and 0.0 <= got <= 1.0
        worst = max(worst, abs(got - float(exact)))
    assert worst < 1e-12
    assert pass_at_k(1000, 0, 1000) == 0.0
    assert pass_at_k(1000, 1, 1000) == 1.0
    assert pass_at_k(4, 2, 1) == 0.5  # pass@1 = c / n


@pytest.mark.parametrize("n, c, k", [(3, 1, 0), (3, 1, 4), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_maj_at_k_hand_built_cases():
    # Clear majority: "4" twice beats "5"; "4" is right.
    assert maj_at_k(["4", "5", "4"], [True, False, True], 3) == 1.0
    # Tie 1-1: the answer that appears first wins ("5", wrong), whatever comes later.
    assert maj_at_k(["5", "4"], [False, True], 2) == 0.0
    assert maj_at_k(["4", "5"], [True, False], 2) == 1.0
    # Tie 2-2 where the first occurrence decides: "7" at index 0 beats "4" at index 1.
    assert majority_index(["7", "4", "4", "7"]) == 0
    # Unparsable answers (None) do not vote, even when they are the most common "answer".
    assert maj_at_k([None, None, None, "4"], [False, False, False, True], 4) == 1.0
    # No votes at all: incorrect.
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    assert majority_index([None, None]) is None
    # Only the first k count: with k=2 the "5"s win, with k=4 "4" (3 votes) does.
    answers, correct = ["5", "5", "4", "4", "4"], [False, False, True, True, True]
    assert maj_at_k(answers, correct, 2) == 0.0
    assert maj_at_k(answers, correct, 5) == 1.0
    # The vote takes the correctness of the first completion giving the winning answer.
    assert maj_at_k(["4", "4"], [False, True], 2) == 0.0


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    values = (rng.random(300) < 0.4).astype(float)
    lo, hi = bootstrap_ci(values, seed=3, n_boot=2000)
    assert (lo, hi) == bootstrap_ci(values, seed=3, n_boot=2000)
    assert lo < values.mean() < hi
    # Binomial standard error sqrt(p(1-p)/n) ~ 0.028: the 95% interval is about +-1.96 of it.
    se = math.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci([0.7], seed=0, n_boot=50) == (0.7, 0.7)


def test_paired_ci_is_narrower_than_unpaired_when_problems_vary():
    # Problem difficulty varies a lot; the second checkpoint adds +0.1 on every problem.
    rng = np.random.default_rng(2)
    a = rng.random(200)
    b = np.clip(a + 0.1, 0, 1.1)
    lo, hi = paired_bootstrap_ci(a, b, seed=0, n_boot=500)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    a_lo, a_hi = bootstrap_ci(a, seed=0, n_boot=500)
    assert a_hi - a_lo > 0.05


def _records(outcomes: dict[str, list[tuple[str | None, bool]]]) -> list[dict]:
    return [
        {
            "id": pid,
            "vote": ans,
            "answer": ans,
            "correct": ok,
            "reward": float(ok),
            "rewards": {"math": float(ok)},
            "tokens": 3,
        }
        for pid, samples in outcomes.items()
        for ans, ok in samples
    ]


def test_summarize_metrics_and_paired_delta():
    base = _records(
        {
            "a": [("1", True), ("2", False), ("2", False), (None, False)],
            "b": [("3", False), ("3", False), ("4", True), ("4", True)],
        }
    )
    s = summarize(base, [1, 2, 4], seed=0, n_boot=200)
    assert s.n == 4
    assert s.metrics["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert s.metrics["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 2)
    assert s.metrics["pass@4"] == 1.0
    # maj@2 -- a: "1" vs "2" tie, "1" came first and is right; b: "3" twice, wrong.
    assert s.metrics["maj@2"] == 0.5
    # maj@4 -- a: "2" has 2 votes (None does not vote), wrong; b: "3" 2 vs "4" 2, "3" first, wrong.
    assert s.metrics["maj@4"] == 0.0
    assert "maj@1" not in s.metrics
    assert s.metrics["extracted"] == 7 / 8
    assert s.metrics["mean_reward"] == s.metrics["reward/math"] == 3 / 8
    assert s.metrics["completion_len"] == 3
    assert s.per_problem["pass@1"] == {"a": 0.25, "b": 0.5}
    # A second checkpoint that gets problem a fully right: delta pass@1 = (1 - 0.25) / 2.
    better = [dict(r, correct=True) if r["id"] == "a" else r for r in base]
    delta, (lo, hi) = paired_delta(
        s, summarize(better, [1], seed=0, n_boot=200), "pass@1", seed=0, n_boot=200
    )
    assert delta == pytest.approx(0.375)
    assert 0 <= lo <= delta <= hi <= 0.75
    with pytest.raises(ValueError, match="exceeds"):
        summarize(base[:3] + base[4:], [4])


def test_unjudged_completions_are_counted_not_scored():
    records = _records({"a": [("1", True), ("2", False)], "b": [("3", False), ("4", False)]})
    assert "unjudged" not in summarize(records, [1], n_boot=10).metrics
    for r in records[2:]:  # problem b has no gold answer: its rule said None
        r.update(reward=None, rewards={"math": None})
    m = summarize(records, [1], n_boot=10).metrics
    assert m["unjudged"] == 0.5 and m["mean_reward"] == m["reward/math"] == 0.5  # means over judged ones


def test_episode_counters_become_tool_metrics_beside_pass_at_k():
    """Records of env= runs carry tool_calls, tool_errors, turns, truncated: their means are metrics."""
    base = {"answer": "1", "vote": "1", "reward": 1.0, "rewards": {"math": 1.0}, "tokens": 3}
    records = [
        {**base, "id": str(i // 2), "correct": i % 2 == 0, "tool_calls": float(i % 3), "tool_errors": 0.0,
         "turns": 1.0 + (i % 3 > 0), "truncated": 0.0}
        for i in range(6)
    ]  # fmt: skip
    metrics = summarize(records, [1]).metrics
    assert metrics["episode/tool_calls"] == sum(i % 3 for i in range(6)) / 6
    assert metrics["episode/turns"] == 10 / 6 and metrics["episode/tool_errors"] == 0.0
    assert (
        "episode/tool_calls"
        not in summarize([{k: v for k, v in r.items() if k != "tool_calls"} for r in records], [1]).metrics
    )
