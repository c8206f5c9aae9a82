"""core.advantages: RLOO's leave-one-out baseline against a float64 loop (GRPO's group baseline is
tested in test_loss.py, with the seed's worked 0.94 / -0.94)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_cli.core.advantages import ADVANTAGES, advantages, group_advantages, rloo_advantages


def _loop_rloo(rewards, g, scale, eps=1e-4):
    """A_i = r_i - mean of the other G - 1 rewards, divided as GRPO divides (unbiased std + eps)."""

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for k in range(0, len(rewards), g):
        group = rewards[k : k + g]
        div = {"group": std(group) + eps, "batch": std(rewards) + eps, "none": 1.0}[scale]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append((r - sum(others) / len(others)) / div)
    return out


@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_rloo_matches_loop(scale, g):
    gen = torch.Generator().manual_seed(g)
    rewards = torch.rand(3 * g, generator=gen, dtype=torch.float64) * 3
    rewards[g : 2 * g] = 0.5  # an all-equal group: zeros, not NaN
    adv = rloo_advantages(rewards, g, scale)
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx(_loop_rloo(rewards.tolist(), g, scale), abs=1e-12)
    assert adv[g : 2 * g].tolist() == [0.0] * g
    assert torch.equal(advantages(rewards, g, "rloo", scale), adv)


def test_rloo_worked_four_of_eight_correct():
    # r_i = 1: the other 7 hold 3 ones, baseline 3/7, A = 4/7; r_i = 0: baseline 4/7, A = -4/7.
    # = G / (G - 1) times GRPO's centred reward 0.5 (8/7 * 1/2 = 4/7), before any scaling.
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)
    adv = rloo_advantages(rewards, 8, "none")
    assert adv.tolist() == pytest.approx([4 / 7] * 4 + [-4 / 7] * 4, abs=1e-15)
    grpo = group_advantages(rewards, 8, "group")
    assert (rloo_advantages(rewards, 8, "group") / grpo).tolist() == pytest.approx([8 / 7] * 8)


def test_estimator_table_and_bad_arguments():
    assert set(ADVANTAGES) == {"group", "rloo"}
    with pytest.raises(ValueError, match="advantage"):
        advantages(torch.ones(4), 2, "ppo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(torch.ones(8), 3)
