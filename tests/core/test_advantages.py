"""core.advantages: RLOO, OPO, pass@k and REINFORCE++ against float64 loops written from their papers'
formulas (GRPO's group baseline is tested in test_loss.py, with the seed's worked 0.94 / -0.94)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from grpo_cli.core.advantages import (
    ADVANTAGES,
    advantages,
    group_advantages,
    opo_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


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


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _divisor(group, rewards, scale, eps=1e-4):
    return {"group": _std(group) + eps, "batch": _std(rewards) + eps, "none": 1.0}[scale]


def _loop_opo(rewards, lengths, g, scale):
    """OPO (arXiv 2505.23585): b = sum_j L_j r_j / sum_j L_j over the group; A_i = (r_i - b) / scale."""
    out = []
    for k in range(0, len(rewards), g):
        group, ls = rewards[k : k + g], lengths[k : k + g]
        b = sum(n * r for n, r in zip(ls, group)) / max(sum(ls), 1)
        out += [(r - b) / _divisor(group, rewards, scale) for r in group]
    return out


def _loop_passk(rewards, g, k, scale):
    """pass@k by enumeration: A_i = mean over every (k - 1)-subset S of the others of
    max(0, r_i - max_S r), i.e. max(S + i) - max(S): o_i's gain to the best of k."""
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            gains = [max(0.0, r - max(s)) for s in itertools.combinations(others, k - 1)]
            out.append(sum(gains) / len(gains) / _divisor(group, rewards, scale))
    return out


def _loop_reinforce_pp(rewards, lengths, g, baseline, eps=1e-4):
    """REINFORCE++ (arXiv 2501.03262): every token of o_i carries x_i (r_i, or r_i minus its group's
    mean); whiten over the batch's tokens: mean and unbiased std over sum_i L_i values."""
    xs = list(rewards)
    if baseline:
        xs = [r - sum(rewards[k - k % g : k - k % g + g]) / g for k, r in enumerate(rewards)]
    tokens = [x for x, n in zip(xs, lengths) for _ in range(int(n))]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1))
    return [(x - mean) / (std + eps) for x in xs]


def _batch(g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(3 * g, generator=gen, dtype=torch.float64) * 3
    rewards[g : 2 * g] = 0.5  # an all-equal group
    lengths = torch.randint(1, 9, (3 * g,), generator=gen).double()
    return rewards, lengths


@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_opo_matches_loop(scale, g):
    rewards, lengths = _batch(g)
    adv = opo_advantages(rewards, g, lengths, scale)
    assert adv.tolist() == pytest.approx(_loop_opo(rewards.tolist(), lengths.tolist(), g, scale), abs=1e-12)
    assert adv[g : 2 * g].tolist() == [0.0] * g  # equal rewards: the weighted baseline is that reward
    assert torch.equal(advantages(rewards, g, "opo", scale, lengths), adv)
    # equal lengths: the length-weighted baseline is the plain mean, so OPO is GRPO's centring
    same = opo_advantages(rewards, g, torch.full_like(lengths, 3.0), scale)
    assert torch.allclose(same, group_advantages(rewards, g, scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize("g,k", [(2, 2), (4, 2), (4, 3), (4, 4), (8, 3), (8, 8)])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_passk_matches_enumeration(g, k, scale):
    rewards, _ = _batch(g, seed=k)
    rewards[2 * g] = rewards[2 * g + 1]  # a tie inside a group
    adv = passk_advantages(rewards, g, k, scale)
    assert adv.tolist() == pytest.approx(_loop_passk(rewards.tolist(), g, k, scale), abs=1e-12)
    assert adv[g : 2 * g].tolist() == [0.0] * g and (adv >= 0).all()
    assert torch.equal(advantages(rewards, g, "passk", scale, k=k), adv)


def test_passk_at_the_group_size_gives_only_the_best_its_lead():
    # k = G (verl's grpo_passk): the best gets r_max - r_second, every other completion 0.
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.7], dtype=torch.float64)
    adv = passk_advantages(rewards, 4, None, "none")
    assert adv.tolist() == pytest.approx([0.0, 0.9 - 0.7, 0.0, 0.0], abs=1e-15)


def test_passk_worked_four_of_eight_correct():
    # Binary rewards, 4 of 8 correct. k = 2: a correct o_i gains 1 over a wrong partner, 4 of its 7 others:
    # A = 4/7; a wrong one gains nothing: 0. k = 4: all 3 partners wrong, C(4, 3) / C(7, 3) = 4/35.
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)
    assert passk_advantages(rewards, 8, 2, "none").tolist() == pytest.approx([4 / 7] * 4 + [0.0] * 4)
    assert passk_advantages(rewards, 8, 4, "none").tolist() == pytest.approx([4 / 35] * 4 + [0.0] * 4)


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("g", [2, 4])
def test_reinforce_pp_matches_token_weighted_whitening(g, baseline):
    rewards, lengths = _batch(g)
    lengths[3] = 0  # an unjudged completion: no tokens, no weight
    adv = reinforce_pp_advantages(rewards, g, lengths, baseline)
    want = _loop_reinforce_pp(rewards.tolist(), lengths.tolist(), g, baseline)
    assert adv.tolist() == pytest.approx(want, abs=1e-12)
    # whitened over tokens: the token-weighted mean is 0 and the token-weighted unbiased variance 1
    n = lengths.sum()
    mean = (lengths * adv).sum() / n
    var = (lengths * (adv - mean) ** 2).sum() / (n - 1)
    assert abs(mean.item()) < 1e-12 and var.item() == pytest.approx(1.0, abs=1e-3)  # eps 1e-4 in the std
    name = "reinforce_pp_baseline" if baseline else "reinforce_pp"
    assert torch.equal(advantages(rewards, g, name, "group", lengths), adv)


def test_estimator_table_and_bad_arguments():
    assert set(ADVANTAGES) == {"group", "rloo", "opo", "passk", "reinforce_pp", "reinforce_pp_baseline"}
    with pytest.raises(ValueError, match="advantage"):
        advantages(torch.ones(4), 2, "ppo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(torch.ones(8), 3)
    with pytest.raises(ValueError, match="2 <= k <= group_size=4"):
        passk_advantages(torch.ones(8), 4, 5)
    with pytest.raises(ValueError, match="2 <= k"):
        passk_advantages(torch.ones(8), 4, 1)
    for name in ("opo", "reinforce_pp"):
        with pytest.raises(ValueError, match="lengths"):
            advantages(torch.ones(8), 4, name)
