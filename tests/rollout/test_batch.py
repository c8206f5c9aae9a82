"""Step sampling: dynamic sampling's group choice, informative groups, overlong shaping, rollout concat."""

from __future__ import annotations

import pytest
import torch

from grpo_cli.rollout import batch as sampling
from grpo_cli.rollout.batch import rollout_metrics
from grpo_cli.rollout.record import Rollout, concat_rollouts


def test_dynamic_sampling_fills_up_with_what_it_has_when_the_cap_is_hit():
    # Informative groups first (in sampled order), then zero-variance ones, returned in sampled order.
    assert sampling.choose_groups([False, True, False, True, True], 2) == [1, 3]
    assert sampling.choose_groups([False, True, False, False], 3) == [0, 1, 2]  # cap hit: filled up
    assert sampling.choose_groups([False, False], 2) == [0, 1]
    rollout = _rollout([[1.0, 0.0], [0.5, 0.5], [0.2, 0.2]])
    assert sampling.informative_groups(rollout.rewards, 2).tolist() == [True, False, False]
    assert rollout_metrics(rollout)["zero_std_frac"] == pytest.approx(2 / 3)


def _rollout(groups: list[list[float]], prompt_len: int = 3, completion_len: int = 2) -> Rollout:
    n = sum(len(g) for g in groups)
    return Rollout(
        prompt_ids=torch.ones(n, prompt_len, dtype=torch.long), prompt_mask=torch.ones(n, prompt_len, dtype=torch.long),
        completion_ids=torch.full((n, completion_len), 5), completion_mask=torch.ones(n, completion_len, dtype=torch.long),
        texts=[f"t{i}" for i in range(n)], rows=[{"id": str(i)} for i in range(n)], group_size=len(groups[0]),
        rewards=torch.tensor([r for g in groups for r in g]), per_rule={"r": [r for g in groups for r in g]},
        reward_metrics={"reward/r": 0.5, "reward/r/errors": 1.0, "reward/unjudged": 0.0},
        reward_counts={"reward/r/errors", "reward/unjudged"},
    )  # fmt: skip


def test_informative_groups_ignore_unjudged_completions():
    rewards = torch.tensor([1.0, float("nan"), 1.0, 1.0, 0.0, float("nan"), float("nan"), float("nan")])
    assert sampling.informative_groups(rewards, 2).tolist() == [False, False, False, False]
    assert sampling.informative_groups(rewards, 4).tolist() == [False, False]
    assert sampling.informative_groups(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 4).tolist() == [True]


def test_concat_rollouts_repads_and_merges_metrics():
    a, b = _rollout([[1.0, 0.0]], prompt_len=3, completion_len=2), _rollout([[0.0, 0.0]], 5, 4)
    both = concat_rollouts([a, b], pad_id=0)
    assert both.prompt_ids.shape == (4, 5) and both.completion_ids.shape == (4, 4)
    assert both.prompt_mask[:2].tolist() == [[0, 0, 1, 1, 1]] * 2  # prompts stay right-aligned
    assert both.completion_mask[:2].tolist() == [[1, 1, 0, 0]] * 2
    assert both.rewards.tolist() == [1.0, 0.0, 0.0, 0.0] and both.per_rule["r"] == [1.0, 0.0, 0.0, 0.0]
    assert both.reward_metrics == {"reward/r": 0.5, "reward/r/errors": 2.0, "reward/unjudged": 0.0}
    assert both.truncated is None  # not recorded by the parts: not made up
    a.truncated, b.truncated = torch.tensor([True, False]), torch.tensor([False, True])
    assert concat_rollouts([a, b], pad_id=0).truncated.tolist() == [True, False, False, True]


def test_overlong_penalty_is_dapos_linear_ramp():
    # max 8 tokens, buffer 4: free up to 8 - 4 = 4 tokens, then -1/4 per token down to -1 at 8.
    lengths = torch.arange(1, 9)
    got = sampling.overlong_penalty(lengths, budget=8, buffer=4, penalty=1.0)
    assert got.tolist() == [0, 0, 0, 0, -0.25, -0.5, -0.75, -1.0]
    assert sampling.overlong_penalty(lengths, 8, 4, 0.5)[-1] == -0.5
    assert sampling.overlong_penalty(lengths, 8, 0, 1.0).abs().sum() == 0
