"""The issue-44 options through ``prepare`` and ``update`` on the float64 model of ``test_update``:
micro-batches of 1, 3 and N give the loss and gradient of one full-batch ``policy_loss`` (whose
formulas ``tests/core`` checks against float64 loop references), every logged statistic adds up over
micro-batches with mu = 2, and two gloo ranks log what one process logs. The step's selections (the
covariance tokens, the rejected completions) are taken once, over every rank's tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import on_two_gloo_ranks
from test_update import (
    REWARDS_4,
    TOL,
    RecordingSGD,
    _cfg,
    _plain_logps,
    _plain_logps_entropy,
    _policy,
    _prepare,
    _rollout,
    _update,
)

from grpo_cli.commands.selections import covariance_tokens
from grpo_cli.commands.update import schedule
from grpo_cli.core.covariance import kl_cov_tokens, selection_count, token_covariance
from grpo_cli.core.loss import aggregation_units, policy_loss
from grpo_cli.core.mismatch import rejected_sequences
from grpo_cli.runtime import distributed

N = len(REWARDS_4)
# Wide covariance windows and ratios, so that a batch of 16 short completions selects some tokens.
COV = {"clip_cov_ratio": 0.2, "clip_cov_lb": -0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.2}
OBJECTIVE_SETS = {
    "sapo": {"objective": "sapo", "tau_pos": 1.0, "tau_neg": 1.05},
    "gpg": {"objective": "gpg"},
    "geo_mean": {"objective": "geo_mean", "epsilon": 0.4, "epsilon_high": 0.4},
    "clip_cov": {"objective": "clip_cov", **COV},
    "kl_cov": {"objective": "kl_cov", "ppo_kl_coef": 0.5, **COV},
    "opo": {"advantage": "opo"},
    "passk": {"advantage": "passk", "passk_k": 2},
    "reinforce_pp": {"advantage": "reinforce_pp"},
    "reinforce_pp_baseline": {"advantage": "reinforce_pp_baseline"},
}
# The engine-mismatch options: a two-sided token mask (IcePop) and sequence rejection.
ENGINE_SETS = {
    "icepop": {"engine_is": {"cap": 1.3, "low": 0.8, "mode": "mask"}},
    "reject_geo_mean": {
        "engine_is": {
            "cap": 1.15,
            "low": 0.87,
            "mode": "reject",
            "level": "sequence",
            "statistic": "geo_mean",
        }
    },
    "reject_k3": {"engine_is": {"cap": 0.02, "mode": "reject", "level": "sequence", "statistic": "mean_k3"}},
}


def _with_engine(rollout, seed: int = 3):
    """The rollout with log mu: the policy's own log-probs plus noise (another engine's numerics)."""
    with torch.no_grad():
        lp = _plain_logps(_policy().model, rollout)
    gen = torch.Generator().manual_seed(seed)
    rollout.engine_logps = lp + 0.3 * torch.randn(lp.shape, generator=gen, dtype=lp.dtype)
    return rollout


def _algo(options: dict) -> dict:
    from grpo_cli.config import EngineISConfig

    out = {k: v for k, v in options.items() if k != "engine_is"}
    if "engine_is" in options:
        out["engine_is"] = EngineISConfig(**options["engine_is"])
    return out


def _batch(options: dict, rewards=REWARDS_4):
    rollout = _rollout(rewards)
    return _with_engine(rollout) if "engine_is" in options else rollout


# Every option under the default aggregation; token_mean for those whose weights depend on it.
CASES = [(o, "seq_mean_token_mean") for o in [*OBJECTIVE_SETS, *ENGINE_SETS]] + [
    (o, "token_mean") for o in ("geo_mean", "kl_cov", "opo", "reinforce_pp", "icepop")
]


@pytest.mark.parametrize("options,aggregation", CASES)
def test_micro_batched_update_equals_one_full_batch_policy_loss(options, aggregation):
    """mu = 1, micro-batches of 1, 3 (splitting groups) and N: loss and gradient equal ``policy_loss``
    over the whole batch on one plain forward, to 1e-10, with the step's selections fed to it whole."""
    spec = {**OBJECTIVE_SETS, **ENGINE_SETS}[options]
    policy, rollout = _policy(), _batch(spec)
    cfg = _cfg(aggregation=aggregation, algo=_algo(spec))
    inputs = _prepare(policy, rollout, cfg)
    units = aggregation_units(inputs.loss_mask, aggregation, rows=inputs.counted)
    policy.model.zero_grad(set_to_none=True)
    logps = _plain_logps(policy.model, rollout)
    weights = None
    if spec.get("engine_is", {}).get("mode") == "mask":
        from grpo_cli.core.mismatch import engine_is_weights

        eis = cfg.algo.engine_is
        weights = engine_is_weights(
            logps.detach(), rollout.engine_logps, inputs.loss_mask, eis.cap, mode="mask", low=eis.low
        )
        assert (weights[inputs.loss_mask] == 0).any() and (weights[inputs.loss_mask] > 0).any()
    want, _ = policy_loss(
        logps, None, None, inputs.advantages, inputs.loss_mask, cfg.algo, units,
        is_weights=weights, cov_mask=inputs.cov_mask,
    )  # fmt: skip
    want.backward()
    want_grads = [p.grad.clone() for p in policy.model.parameters()]
    assert sum(float(g.abs().sum()) for g in want_grads) > 1e-6
    for micro in (1, 3, N):
        policy = _policy()
        cfg = _cfg(micro=micro, aggregation=aggregation, algo=_algo(spec))
        got_inputs = _prepare(policy, _batch(spec), cfg)
        for name in ("cov_mask", "rejected", "loss_mask"):
            a, b = getattr(got_inputs, name), getattr(inputs, name)
            assert (a is None and b is None) or torch.equal(a, b), (micro, name)
        opt = RecordingSGD(policy.model.parameters(), lr=0.0)
        stats = _update(policy, opt, schedule(opt, 0), got_inputs, cfg)
        assert stats["loss"] == pytest.approx(want.item(), abs=TOL), micro
        for got, exp in zip(opt.seen[0], want_grads):
            assert torch.allclose(got, exp, rtol=0, atol=TOL), micro


def test_covariance_tokens_are_chosen_from_pi_old_over_the_whole_step():
    """kl_cov: the tokens of largest (log pi_old - mean)(A - mean) over the step's loss tokens, the same
    for any micro-batch size; clip_cov: drawn among the candidates, the same draw for the same step."""
    policy, rollout = _policy(), _rollout(REWARDS_4)
    kl = _prepare(policy, rollout, _cfg(algo=OBJECTIVE_SETS["kl_cov"]))
    with torch.no_grad():
        old, _ = _plain_logps_entropy(policy.model, rollout)
    m = kl.loss_mask
    adv = kl.advantages[:, None].expand_as(old)
    cov = token_covariance(old[m], adv[m])
    count = selection_count(0.2, int(m.sum()))
    assert count >= 3 and int(kl.cov_mask.sum()) >= count  # ties (a group's first token) come in together
    chosen = kl.cov_mask[m]
    assert cov[chosen].min() >= cov[~chosen].max() - 1e-9  # the largest covariances
    assert torch.equal(kl.cov_mask[m], kl_cov_tokens(cov, count, 1e-5))
    clip = [
        _prepare(policy, rollout, _cfg(micro=micro, algo=OBJECTIVE_SETS["clip_cov"])).cov_mask
        for micro in (1, 3)
    ]
    assert torch.equal(clip[0], clip[1]) and int(clip[0].sum()) == selection_count(0.2, int(m.sum()))
    inside = (cov > -0.5) & (cov < 5.0)
    assert inside[clip[0][m]].all()  # only candidates
    algo = _cfg(algo=OBJECTIVE_SETS["clip_cov"]).algo
    other_step = covariance_tokens(old, kl.advantages, m, algo, seed=1)
    assert int(other_step.sum()) == int(clip[0].sum())  # the step number seeds the draw
    assert not torch.equal(other_step, covariance_tokens(old, kl.advantages, m, algo, seed=2))


def test_rejected_completions_leave_the_loss_and_every_denominator():
    """mode=reject: the completions whose geometric-mean ratio pi_old / mu leaves [low, cap] are out of
    the loss mask and the seq_mean_* count; ``engine_is/rejected_frac`` is their share."""
    spec = ENGINE_SETS["reject_geo_mean"]
    policy, rollout = _policy(), _batch(spec)
    cfg = _cfg(algo=_algo(spec))
    inputs = _prepare(policy, rollout, cfg)
    with torch.no_grad():
        old = _plain_logps(policy.model, rollout)
    model = rollout.completion_mask.bool()
    want = rejected_sequences(old, rollout.engine_logps, model, 1.15, "geo_mean", 0.87)
    assert 0 < int(want.sum()) < N and torch.equal(inputs.rejected, want)
    assert not inputs.loss_mask[want].any() and not inputs.counted[want].any()
    opt = RecordingSGD(policy.model.parameters(), lr=0.0)
    stats = _update(policy, opt, schedule(opt, 0), inputs, cfg)
    assert stats["engine_is/rejected_frac"] == pytest.approx(float(want.sum()) / N)
    plain = _rollout(REWARDS_4)  # the hf engine: mu is pi_old itself, nothing to reject
    assert _prepare(policy, plain, cfg).rejected is None


def _step_stats(micro: int, options: dict, rows: list[int] | None = None, k: int = 1) -> dict[str, float]:
    """``update``'s statistics after mu = 2 iterations (SGD lr 0.5: the second iteration's ratios move
    off 1) of each of ``k`` mini-batches, beta 0.04, a narrow clip, over the rows ``rows`` (default all)."""
    policy, rollout = _policy(ref=True), _batch(options)
    if rows is not None:
        rollout = rollout.select(rows)
    if distributed.world().enabled:
        policy.wrapper = distributed.wrap(policy.model, "ddp")
    cfg = _cfg(micro=micro, beta=0.04, mu=2, algo={**_algo(options), "steps_per_generation": k})
    if cfg.algo.objective in ("clip", "clip_cov"):
        cfg.algo.epsilon = 0.02
    # k mini-batches take k * mu SGD steps: a smaller lr keeps four of them finite
    opt = RecordingSGD(policy.model.parameters(), lr=0.5 if k == 1 else 0.05)
    return _update(policy, opt, schedule(opt, 0), _prepare(policy, rollout, cfg), cfg)


STAT_SETS = {**OBJECTIVE_SETS, **ENGINE_SETS}


@pytest.mark.parametrize("options", list(STAT_SETS))
def test_every_logged_statistic_is_the_same_for_any_micro_batch_size(options):
    whole = _step_stats(N, STAT_SETS[options])
    assert whole["ratio/min"] < 1.0 < whole["ratio/max"]  # mu = 2: the second pass is off policy
    if options in ("clip_cov", "kl_cov"):
        assert 0 < whole["clip/cov_frac"] < 1
    if options == "geo_mean":
        assert whole["clip/low_frac"] + whole["clip/high_frac"] > 0
    if options == "icepop":
        assert 0 < whole["engine_is/masked_frac"] < 1
    for micro in (1, 3):
        got = _step_stats(micro, STAT_SETS[options])
        assert got.keys() == whole.keys()
        for key, value in whole.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (options, micro, key)


@pytest.mark.parametrize("options", ["clip_cov", "kl_cov", "reinforce_pp", "reject_geo_mean"])
def test_the_selections_hold_over_mini_batches(options):
    """k = 2 mini-batches of whole groups (two optimizer steps, each mu = 2): the step's selections and
    batch-wide advantages are fixed before the first, so micro-batches of 1 and 3 log what N logs."""
    whole = _step_stats(N, STAT_SETS[options], k=2)
    assert all(math.isfinite(v) for v in whole.values()) and whole["ratio/max"] > 1.0
    for micro in (1, 3):
        got = _step_stats(micro, STAT_SETS[options], k=2)
        for key, value in whole.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (options, micro, key)


def _rank_stats(rank: int) -> dict[str, float]:
    half = N // 2
    rows = list(range(rank * half, (rank + 1) * half))
    out = {}
    for name, options in STAT_SETS.items():
        out.update({f"{name}/{k}": v for k, v in _step_stats(3, options, rows).items()})
    return out


@pytest.mark.slow
def test_every_logged_statistic_is_the_same_on_one_rank_and_on_two(tmp_path):
    """Two gloo ranks, two of the four groups each: the batch-wide estimators (reinforce_pp), the
    covariance selection and the rejections are taken over both ranks, so each logs what one process
    logs on all four groups."""
    ranks = on_two_gloo_ranks(_rank_stats, tmp_path)
    one = {}
    for name, options in STAT_SETS.items():
        one.update({f"{name}/{k}": v for k, v in _step_stats(N, options).items()})
    for rank, two in enumerate(ranks):
        assert two.keys() == one.keys()
        for key, value in one.items():
            assert two[key] == pytest.approx(value, abs=1e-9), (rank, key)
