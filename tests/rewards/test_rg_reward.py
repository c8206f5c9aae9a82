"""reward=reasoning_gym: the task's own score_answer on the extracted answer (partial credit kept), a
scorer that hangs or raises contained and counted, and the line naming the extra when it is missing."""

from __future__ import annotations

import sys
import time

import pytest

from grpo_cli.config import ConfigError, DataConfig
from grpo_cli.data import load_rows
from grpo_cli.rewards import build_rewarder
from grpo_cli.rewards.reasoning_gym import EXTRA, ReasoningGymReward


@pytest.fixture(scope="module")
def rg():
    return pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def reward(rg):
    rule = ReasoningGymReward(workers=2, timeout=20.0)
    yield rule
    rule.close()


def rows_of(task, n=6, **task_config):
    cfg = DataConfig(
        name="reasoning_gym", task=task, task_config=task_config, train_size=50, test_size=n, seed=3
    )
    return load_rows(cfg, "test")


def test_answer_extraction(rg):
    rule = ReasoningGymReward(workers=1)  # workers start on the first call: none here
    assert rule.answer_of("think <answer>1</answer> then <answer> 42 </answer>") == "42"
    assert rule.answer_of("  -12 \n") == "-12"
    assert rule.answer_of("   ") is None
    strict = ReasoningGymReward(untagged="none", tag="final")
    assert strict.answer_of("-12") is None and strict.answer_of("<final>7</final>") == "7"
    with pytest.raises(ConfigError):
        ReasoningGymReward(untagged="last_line")


@pytest.mark.parametrize("task", ["chain_sum", "basic_arithmetic", "spell_backward", "gcd", "word_sorting"])
def test_score_equals_the_tasks_own_score_answer(rg, reward, task):
    rows = rows_of(task)
    # Right, wrong, tagged, and answers that earn partial credit where the task grades it.
    answers = []
    for row in rows:
        gold = row["answer"]
        answers += [gold, f"<answer>{gold}</answer>", f"x {gold}", "0", f"<answer>{gold}9</answer>", ""]
    expanded = [row for row in rows for _ in range(6)]
    got = reward(answers, expanded)
    for text, row, score in zip(answers, expanded, got):
        own = rg.create_dataset(row["task"], **row["task_config"])
        assert score == own.score_answer(reward.answer_of(text), row["entry"]), (text, row["answer"])
    assert 1.0 in got and 0.0 in got


def test_partial_credit_is_kept(rg, reward):
    row = rows_of("chain_sum", n=1)[0]
    gold = row["answer"]
    score = reward([f"about {gold}"], [row])[0]
    assert score == pytest.approx(len(gold) / len(f"about {gold}"))  # reasoning-gym's own rule for it
    assert reward.metrics()["partial"] == 1.0
    rewarder = build_rewarder(
        [{"name": "rg", "_target_": "grpo_cli.rewards.reasoning_gym.ReasoningGymReward"}]
    )
    with rewarder:
        result = rewarder([f"about {gold}", gold], [row, row])
    assert result.total == [pytest.approx(score), 1.0]
    assert result.metrics["reward/rg/partial"] == 1.0


def test_a_scorer_that_hangs_is_cut_off_counted_and_the_pool_recovers(rg):
    # simple_integration hands the answer to sympy.parse_expr: "9**9**9**9" never returns.
    row = rows_of("simple_integration", n=1)[0]
    rule = ReasoningGymReward(workers=1, timeout=1.0)
    try:
        assert rule([row["answer"]], [row]) == [1.0]  # worker started and warm
        start = time.monotonic()
        assert rule(["9**9**9**9"], [row]) == [0.0]
        assert time.monotonic() - start < 1.0 + 10.0  # the timeout plus a replacement worker's start
        assert rule.metrics()["timeouts"] == 1.0
        assert rule([row["answer"]], [row]) == [1.0]
    finally:
        rule.close()


def test_a_scorer_that_raises_scores_zero_and_is_counted(rg, reward):
    row = dict(rows_of("chain_sum", n=1)[0], task="no_such_task")  # create_dataset raises in the worker
    good = rows_of("chain_sum", n=1)[0]
    assert reward([good["answer"], good["answer"]], [row, good]) == [0.0, 1.0]
    assert reward.metrics()["errors"] == 1.0


def test_rows_no_task_made_cannot_be_judged(rg, reward):
    assert reward(["14"], [{"id": "0", "question": "Calculate 2 + 2 * 6", "answer": "14"}]) == [None]


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ConfigError) as err:
        build_rewarder([{"name": "rg", "_target_": "grpo_cli.rewards.reasoning_gym.ReasoningGymReward"}])
    assert str(err.value) == EXTRA
