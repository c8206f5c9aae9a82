"""Several optimizer steps per rollout batch (``algo.steps_per_generation`` = k), against float64
references written from the formula on the float64 model of ``test_update``.

With k = 2 the batch of 4 groups is split into two mini-batches of 2 whole groups (groups 0, 2 and
1, 3): the first step's ratios are exactly 1 (pi_old is the sampling policy, its log-probs taken before
any step), the second's are not, each step's loss is normalised by its own mini-batch, and the split
is the same on 1 rank and on 2.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import on_two_gloo_ranks
from test_update import (
    NEW_OPTIONS,
    REWARDS_4,
    TOL,
    RecordingSGD,
    _cfg,
    _options_reference,
    _plain_logps,
    _policy,
    _rollout,
)

from grpo_cli.commands import update as update_module
from grpo_cli.commands.passes import micro_batches, mini_batch_rows
from grpo_cli.commands.update import prepare, schedule, update
from grpo_cli.core.loss import aggregation_units
from grpo_cli.runtime import distributed

LR = 0.5


def _run(k: int, mu: int = 1, micro: int = 3, lr: float = LR, record: list | None = None, monkeypatch=None):
    """One update with k mini-batches; ``record`` collects (logps, old, stats) of every policy_loss call."""
    policy, rollout = _policy(), _rollout(REWARDS_4)
    cfg = _cfg(micro=micro, mu=mu, algo={"steps_per_generation": k})
    if record is not None:
        real = update_module.policy_loss

        def recording(logps, old, *args, **kwargs):
            loss, st = real(logps, old, *args, **kwargs)
            record.append((logps.detach().clone(), None if old is None else old.clone(), st))
            return loss, st

        monkeypatch.setattr(update_module, "policy_loss", recording)
    before = [p.detach().clone() for p in policy.model.parameters()]
    inputs = prepare(policy, rollout, cfg.algo, micro, cfg.rollout.temperature)
    opt = RecordingSGD(policy.model.parameters(), lr=lr)
    stats = update(policy, opt, schedule(opt, 0), inputs, cfg.algo, cfg.train, cfg.rollout.temperature)
    return policy, rollout, inputs, opt, stats, before


def test_mini_batches_are_whole_groups_strided_over_the_batch():
    # 4 groups of 2 rows, k = 2: groups 0 and 2, then 1 and 3
    assert [r.tolist() for r in mini_batch_rows(4, 2, 2)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [r.tolist() for r in mini_batch_rows(6, 1, 3)] == [[0, 3], [1, 4], [2, 5]]
    assert mini_batch_rows(3, 4, 1) is None  # k = 1: the whole batch, as before the option existed
    with pytest.raises(ValueError, match="steps_per_generation=3 must divide the 4 groups"):
        mini_batch_rows(4, 4, 3)


def test_pi_old_is_taken_only_when_mu_or_k_exceed_one():
    policy, rollout = _policy(), _rollout(REWARDS_4)
    cfg = _cfg(micro=3)
    t = cfg.rollout.temperature
    assert prepare(policy, rollout, cfg.algo, 3, t).old_logps is None  # k = 1
    old = prepare(policy, rollout, replace(cfg.algo, steps_per_generation=2), 3, t).old_logps
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        assert torch.allclose(old[mask], _plain_logps(policy.model, rollout)[mask], rtol=0, atol=TOL)


def test_first_mini_batch_ratio_is_exactly_one_and_the_second_moves(monkeypatch):
    calls = []
    _, _, inputs, opt, stats, _ = _run(2, record=calls, monkeypatch=monkeypatch)
    assert len(opt.seen) == 2  # one optimizer step per mini-batch
    assert len(calls) == 6  # each mini-batch of 8 rows in micro-batches of 3, 3, 2
    for logps, old, st in calls[:3]:
        assert torch.equal(logps, old)  # bit for bit: the same forward cut the same way
        assert float(st.ratio_min) == 1.0 == float(st.ratio_max)
    second = inputs.loss_mask[mini_batch_rows(4, 4, 2)[1]]
    moved = [(lp - old).abs()[second[s]] for (lp, old, _), s in zip(calls[3:], micro_batches(8, 3))]
    assert float(torch.cat(moved).max()) > 1e-4
    # The logged statistics cover the whole batch: every token counted, the second step's ratios seen.
    assert stats["tokens"] == float(inputs.loss_mask.sum())
    assert stats["ratio/min"] < 1.0 < stats["ratio/max"]


def _minibatch_reference(model, rollout, old, adv, mask, eps):
    """-J over one mini-batch (seq_mean_token_mean, beta 0), its own N rows as the denominator, written
    from the formula: sum_{i,t} -min(rho A, clip(rho, 1 - eps, 1 + eps) A) / (N |o_i|)."""
    logps = _plain_logps(model, rollout)
    rho = torch.exp(logps - old)
    a = adv.double()[:, None]
    surrogate = torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
    m = mask.double()
    w = m / (mask.size(0) * m.sum(1, keepdim=True).clamp(min=1))
    return -(w * surrogate).sum()


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_each_step_is_its_mini_batchs_own_loss_with_the_sampling_policy_as_pi_old():
    """Step 1's gradient: mini-batch 1's loss (groups 0, 2) at the start weights; step 2's: mini-batch
    2's (groups 1, 3) at the weights after step 1 (SGD: w - lr g1), with pi_old the start weights'
    log-probs; both with their own 8 rows as the denominator, to 1e-10 in float64."""
    policy, rollout, inputs, opt, _, before = _run(2, micro=3)
    eps = _cfg().algo.epsilon
    ref_model = _policy().model  # the start weights again
    with torch.no_grad():
        old = _plain_logps(ref_model, rollout)
    for step, rows in enumerate(mini_batch_rows(4, 4, 2)):
        if step == 1:  # the weights after step 1
            with torch.no_grad():
                for p, g in zip(ref_model.parameters(), opt.seen[0]):
                    p.sub_(LR * g)
        part = rollout.select(rows)
        loss = _minibatch_reference(
            ref_model, part, old[rows], inputs.advantages[rows], inputs.loss_mask[rows], eps
        )
        for got, want in zip(opt.seen[step], _grads(ref_model, loss)):
            assert torch.allclose(got, want, rtol=0, atol=TOL), step
    assert sum(float(g.abs().sum()) for g in opt.seen[1]) > 1e-3  # a gradient worth comparing


def test_two_mini_batch_steps_differ_from_one_step_on_the_whole_batch():
    one, *_ = _run(1)
    two, *_ = _run(2)
    gap = max(
        float((a - b).detach().abs().max()) for a, b in zip(one.model.parameters(), two.model.parameters())
    )
    assert gap > 1e-4


def test_mu_passes_over_k_mini_batches_keep_the_sampling_policy_as_pi_old(monkeypatch):
    """mu = 2, k = 2: four optimizer steps (pass 1: mini-batches 1, 2; pass 2: 1, 2); only the very
    first step sees ratio 1, because pi_old stays the policy that sampled."""
    calls = []
    _, _, _, opt, stats, _ = _run(2, mu=2, micro=8, record=calls, monkeypatch=monkeypatch)
    assert len(opt.seen) == 4 and len(calls) == 4  # micro 8: one micro-batch per mini-batch
    assert torch.equal(calls[0][0], calls[0][1])
    olds = [old for _, old, _ in calls]
    assert torch.equal(olds[0], olds[2]) and torch.equal(olds[1], olds[3])  # fixed across passes
    for lp, old, _ in calls[1:]:
        assert not torch.equal(lp, old)
    assert stats["skipped"] == 0.0


def test_the_issue30_options_hold_per_mini_batch():
    """k = 2 with truncated rows masked, the top half of the entropies and an entropy bonus: the token
    set is the one k = 1 picks (one threshold per step, fixed before the first optimizer step), and
    step 1's gradient is mini-batch 1's loss with its own counted rows (truncated ones out) as the
    denominator, to 1e-10 against a full-softmax forward put through ``policy_loss``."""
    algo = {**NEW_OPTIONS, "max_completion_length": 6}
    policy, rollout = _policy(), _rollout(REWARDS_4)
    cfg = _cfg(micro=3, algo={**algo, "steps_per_generation": 2})
    t = cfg.rollout.temperature
    whole = prepare(policy, rollout, replace(cfg.algo, steps_per_generation=1), 3, t)
    inputs = prepare(policy, rollout, cfg.algo, 3, t)
    assert torch.equal(inputs.pg_mask, whole.pg_mask) and torch.equal(inputs.counted, whole.counted)
    first = mini_batch_rows(4, 4, 2)[0]
    mini = inputs.select(first)
    units = aggregation_units(mini.loss_mask, cfg.algo.aggregation, rows=mini.counted)
    assert units < first.numel()  # a truncated row sits in mini-batch 1: the test can tell
    _, want_grads, _ = _options_reference(policy.model, rollout.select(first), mini, cfg.algo, units)
    opt = RecordingSGD(policy.model.parameters(), lr=LR)
    stats = update(policy, opt, schedule(opt, 0), inputs, cfg.algo, cfg.train, t)
    assert len(opt.seen) == 2
    for got, w in zip(opt.seen[0], want_grads):
        assert torch.allclose(got, w, rtol=0, atol=TOL)
    assert stats["tokens"] == float(inputs.loss_mask.sum()) and stats["entropy"] > 0


def _k2_stats(rows: list[int] | None = None, algo: dict | None = None) -> dict[str, float]:
    """``update``'s statistics with k = 2, mu = 2, beta 0.04 and a narrow clip, on ``rows`` (default all)."""
    policy, rollout = _policy(ref=True), _rollout(REWARDS_4)
    if rows is not None:
        rollout = rollout.select(rows)
    if distributed.world().enabled:
        policy.wrapper = distributed.wrap(policy.model, "ddp")
    cfg = _cfg(micro=3, beta=0.04, mu=2, algo={**(algo or {}), "steps_per_generation": 2})
    cfg.algo.epsilon = 0.02
    opt = RecordingSGD(policy.model.parameters(), lr=LR)
    inputs = prepare(policy, rollout, cfg.algo, 3, cfg.rollout.temperature)
    return update(policy, opt, schedule(opt, 0), inputs, cfg.algo, cfg.train, cfg.rollout.temperature)


def _rank_k2(rank: int) -> dict[str, float]:
    half = len(REWARDS_4) // 2
    rows = list(range(rank * half, (rank + 1) * half))
    stats = _k2_stats(rows)
    stats.update({f"new/{k}": v for k, v in _k2_stats(rows, NEW_OPTIONS).items()})
    return stats


@pytest.mark.slow
def test_mini_batches_hold_the_same_groups_on_one_rank_and_on_two(tmp_path):
    """Rank 0 holds groups 0, 1 and rank 1 groups 2, 3; each rank's mini-batch 1 is its first group,
    so the global mini-batch 1 is groups 0 and 2 as on one process: the statistics agree to 1e-9."""
    ranks = on_two_gloo_ranks(_rank_k2, tmp_path)
    one = _k2_stats()
    one.update({f"new/{k}": v for k, v in _k2_stats(None, NEW_OPTIONS).items()})
    assert one["ratio/min"] < 1.0 < one["ratio/max"] and one["clip/low_frac"] + one["clip/high_frac"] > 0
    for rank, two in enumerate(ranks):
        assert two.keys() == one.keys()
        for key, value in one.items():
            assert two[key] == pytest.approx(value, abs=1e-9), (rank, key)
