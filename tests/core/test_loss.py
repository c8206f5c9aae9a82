"""core.loss against hand arithmetic and a float64 reference written as plain Python loops."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from grpo_cli.core.advantages import group_advantages
from grpo_cli.core.loss import (
    KL_ESTIMATORS,
    LossConfig,
    aggregation_units,
    entropy_threshold,
    policy_loss,
)
from grpo_cli.core.mismatch import engine_is_weights
from grpo_cli.core.stats import LOGGED_STATS, LossStats, combine_stats

AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
LEVELS = ("token", "sequence")
T_MAX = 9


# ---------------------------------------------------------------------------- the seed's worked numbers


def test_worked_advantages_four_of_eight_correct():
    # mean = 4/8 = 0.5; deviations +-0.5; unbiased var = 8 * 0.25 / 7 = 2/7; std = 0.53452
    # A = 0.5 / (0.53452 + 1e-4) = 0.93524 -> 0.94 and -0.94
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])
    adv = group_advantages(rewards, group_size=8)
    expected = 0.5 / (math.sqrt(2 / 7) + 1e-4)
    assert adv[:4].tolist() == pytest.approx([expected] * 4, abs=1e-6)
    assert adv[4:].tolist() == pytest.approx([-expected] * 4, abs=1e-6)
    assert [round(a, 2) for a in adv.tolist()] == [0.94] * 4 + [-0.94] * 4
    assert round(expected, 3) == 0.935


def _one_token_rows(p_new, p_old, adv, **cfg):
    """Completions of one token each: logps = log p_new, old = log p_old."""
    logps = torch.tensor(p_new, dtype=torch.float64).log()[:, None].requires_grad_()
    old = torch.tensor(p_old, dtype=torch.float64).log()[:, None]
    mask = torch.ones_like(old, dtype=torch.bool)
    config = LossConfig(beta=0.0, aggregation="token_mean", **cfg)
    loss, stats = policy_loss(logps, old, None, torch.tensor(adv, dtype=torch.float64), mask, config)
    loss.backward()
    return loss, stats, logps.grad[:, 0]


def test_worked_ratios_clip_at_epsilon_02():
    # 0.9/0.5 = 1.8, A=+1: min(1.8 * 1, clip(1.8, 0.8, 1.2) * 1) = min(1.8, 1.2) = 1.2
    # 0.2/0.5 = 0.4, A=-1: min(0.4 * -1, clip(0.4) * -1) = min(-0.4, -0.8) = -0.8
    # 0.7/0.5 = 1.4, A=+1: min(1.4, 1.2) = 1.2
    # token_mean loss = -(1.2 - 0.8 + 1.2) / 3 = -1.6 / 3
    loss, stats, grad = _one_token_rows([0.9, 0.2, 0.7], [0.5, 0.5, 0.5], [1.0, -1.0, 1.0], epsilon=0.2)
    assert loss.item() == pytest.approx(-1.6 / 3, abs=1e-12)
    assert grad.tolist() == [0.0, 0.0, 0.0]  # every clip is active: no gradient anywhere
    s = stats.to_dict()
    assert s["clip/high_frac"] == pytest.approx(2 / 3) and s["clip/low_frac"] == pytest.approx(1 / 3)
    assert (s["ratio/min"], s["ratio/max"]) == pytest.approx((0.4, 1.8))
    assert s["ratio/mean"] == pytest.approx((1.8 + 0.4 + 1.4) / 3)
    assert s["loss/policy"] == pytest.approx(-1.6 / 3) and s["tokens"] == 3.0


def test_asymmetric_epsilon_high_lets_ratio_rise_further():
    # DAPO clip-higher, epsilon_high = 0.28: 0.7/0.5 = 1.4 -> 1.28 instead of 1.2; 1.25 passes unclipped
    loss, stats, grad = _one_token_rows([0.7, 0.625], [0.5, 0.5], [1.0, 1.0], epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-(1.28 + 1.25) / 2, abs=1e-12)
    assert grad.tolist() == pytest.approx([0.0, -1.25 / 2], abs=1e-12)  # d(-r A / 2)/dlogp = -r A / 2
    assert stats.to_dict()["clip/high_frac"] == pytest.approx(0.5)


def test_gradient_through_clipped_ratio_only_on_the_advantage_side():
    # Clip active (min picks the constant): r=1.8 with A>0, r=0.4 with A<0 -> gradient exactly 0.
    # Ratio outside the range but on the other side: r=1.8 with A<0 gives min(-1.8, -1.2) = -1.8,
    # r=0.4 with A>0 gives min(0.4, 0.8) = 0.4: the unclipped term, gradient -r A / 4.
    p_new, adv = [0.9, 0.2, 0.9, 0.2], [1.0, -1.0, -1.0, 1.0]
    loss, stats, grad = _one_token_rows(p_new, [0.5] * 4, adv, epsilon=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 0.8 - 1.8 + 0.4) / 4, abs=1e-12)
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0
    assert grad[2].item() == pytest.approx(-(1.8 * -1.0) / 4, abs=1e-12)
    assert grad[3].item() == pytest.approx(-(0.4 * 1.0) / 4, abs=1e-12)
    s = stats.to_dict()
    assert s["clip/high_frac"] == pytest.approx(0.25) and s["clip/low_frac"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------- group_advantages


def _loop_advantages(rewards, g, scale, eps=1e-4):
    def std(xs):  # unbiased
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for k in range(0, len(rewards), g):
        group = rewards[k : k + g]
        mean = sum(group) / g
        div = {"group": std(group) + eps, "batch": std(rewards) + eps, "none": 1.0}[scale]
        out += [(r - mean) / div for r in group]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop(scale):
    rewards = torch.rand(24, dtype=torch.float64) * 3
    rewards[8:12] = 0.5  # one all-equal group of 4
    adv = group_advantages(rewards, group_size=4, scale=scale)
    assert adv.tolist() == pytest.approx(_loop_advantages(rewards.tolist(), 4, scale), abs=1e-12)
    assert adv[8:12].tolist() == [0.0] * 4


def test_group_advantages_all_equal_gives_zeros_not_nan():
    adv = group_advantages(torch.ones(16), group_size=8)
    assert torch.equal(adv, torch.zeros(16))


def test_group_advantages_std_is_unbiased():
    # rewards 0, 1: mean 0.5, unbiased std sqrt(0.5) (the biased one would be 0.5)
    adv = group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), group_size=2, eps=0.0)
    assert adv.tolist() == pytest.approx([-0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)])


def test_group_advantages_rejects_bad_arguments():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(8), group_size=3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(8), group_size=4, scale="rank")


# ---------------------------------------------------------------------------- float64 loop reference


def _kl_and_grad(estimator, x):
    """KL estimate at x = ref - logp and its derivative w.r.t. logp (dx/dlogp = -1)."""
    if estimator == "k1":
        return -x, 1.0
    if estimator == "k2":
        return 0.5 * x * x, -x
    return math.exp(x) - x - 1.0, -(math.exp(x) - 1.0)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _surrogate(r, a, lp, cfg, x=0.0, sel=False):
    """(S, dS/dr, dS/dlogp directly) of one token, from the papers' formulas written plainly.

    ``x`` = log pi_theta - log pi_old of the token, ``sel``: covariance-selected (clip_cov, kl_cov).
    """
    lo, hi = 1 - cfg.epsilon, 1 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
    clipped = min(max(r, lo), hi)
    objective = getattr(cfg, "objective", "clip")
    if objective == "cispo":  # sg(clip(r)) * A * log pi: a weight, no d/dr
        return clipped * a * lp, 0.0, clipped * a
    if objective == "sapo":  # 4/tau sigmoid(tau (r - 1)) A, tau by the sign of A; d/dr = 4 s (1 - s) A
        tau = cfg.tau_pos if a > 0 else cfg.tau_neg
        sig = _sigmoid(tau * (r - 1))
        return 4 / tau * sig * a, 4 * sig * (1 - sig) * a, 0.0
    if objective == "gpg":  # A log pi, no ratio
        return a * lp, 0.0, a
    if objective == "kl_cov":  # r A, minus coef |x| on the selected tokens; d|x|/dlogp = sign(x)
        if not sel:
            return r * a, a, 0.0
        sign = (x > 0) - (x < 0)
        return r * a - cfg.ppo_kl_coef * abs(x), a, -cfg.ppo_kl_coef * sign
    if objective == "clip_cov" and sel:  # cut out: no value, no gradient
        return 0.0, 0.0, 0.0
    delta, c = getattr(cfg, "delta", None), getattr(cfg, "clip_ratio_c", None)
    # (value, d value / d r): the unclipped term, capped at delta (two-sided, INTELLECT-2 / TRL) ...
    first = (r * a, a) if delta is None or r <= delta else (delta * a, 0.0)
    # ... against the clipped one (PPO), whose derivative is a only inside the range
    second = (clipped * a, a if lo <= r <= hi else 0.0)
    value, d_r = min(first, second, key=lambda v: v[0])
    if c is not None and a < 0 and c * a > value:  # dual-clip (Ye et al. 2020): max(., c A) for A < 0
        value, d_r = c * a, 0.0
    return value, d_r, 0.0


def _geo_mean_sequence(xs, a, cfg):
    """GMPO for one completion: (S_i, [d S_i / d x_t]) with S_i = A exp(mean_t x'_t), x'_t the token's
    log-ratio clipped to [-epsilon, epsilon_high] only where sgn(A) x_t exceeds the bound (PPO's rule in
    log space); sgn(A) = 0 makes every x'_t 0."""
    lo, hi = cfg.epsilon, cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    kept, slope = [], []
    for x in xs:
        if a == 0:
            kept.append(0.0), slope.append(0.0)
        elif a > 0 and x > hi:
            kept.append(hi), slope.append(0.0)
        elif a < 0 and x < -lo:
            kept.append(-lo), slope.append(0.0)
        else:
            kept.append(x), slope.append(1.0)
    s_i = a * math.exp(sum(kept) / max(len(xs), 1))
    return s_i, [s_i * d / len(xs) for d in slope]


def _clip_counts(r, x, a, cfg):
    """(low, high, cap) clip indicators of one token for the statistics, per objective."""
    objective = getattr(cfg, "objective", "clip")
    lo, hi = 1 - cfg.epsilon, 1 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
    if objective == "geo_mean":  # in log space
        e_lo, e_hi = cfg.epsilon, cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        return (x < -e_lo and a < 0), (x > e_hi and a > 0), False
    if objective in ("sapo", "gpg", "kl_cov"):
        return False, False, False
    if objective == "cispo":
        return r < lo, r > hi, False
    caps = [v for v in (getattr(cfg, "clip_ratio_c", None), getattr(cfg, "delta", None)) if v is not None]
    return (r < lo and a < 0), (r > hi and a > 0), (r > min(caps, default=math.inf) and a < 0)


def _reference(logp, old, ref, adv, mask, cfg, isw=None, ent=None, pg=None, sel=None):
    """Loss, d loss / d logp and stats, one completion and one token at a time.

    ``isw``: per-token weights of the surrogate (engine importance sampling), 1 when None. ``ent``:
    per-token entropies (the bonus -entropy_coef * H; d loss / d H in ``stats["d_entropy"]``).
    ``pg``: per-token 0/1, the tokens that get the surrogate (top_entropy_quantile), all when None.
    ``sel``: per-token 0/1, the covariance-selected tokens (clip_cov / kl_cov), none when None.
    """
    B, T = len(logp), len(logp[0])
    geo = getattr(cfg, "objective", "clip") == "geo_mean"
    coef = getattr(cfg, "entropy_coef", 0.0)
    total_tokens = sum(map(sum, mask))
    loss, grad, d_ent = 0.0, [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    kl_sum, ent_sum, n_low, n_high, n_cap, n_sel, n_masked, ratios = 0.0, 0.0, 0, 0, 0, 0, 0, []
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        if cfg.aggregation == "token_mean":
            w = 1.0 / max(total_tokens, 1)
        elif cfg.aggregation == "seq_mean_token_mean":
            w = 1.0 / (B * max(len(toks), 1))
        else:
            w = 1.0 / (B * cfg.max_completion_length)
        seq_r = math.exp(sum(logp[i][t] - old[i][t] for t in toks) / max(len(toks), 1))
        if cfg.importance_level == "sequence" and toks:
            ratios.append(seq_r)
        if geo:
            geo_s, geo_d = _geo_mean_sequence([logp[i][t] - old[i][t] for t in toks], adv[i], cfg)
        d_seq, geo_weight = 0.0, 0.0  # d loss / d s_i (GSPO); sum of the weights S_i gets (GMPO)
        for t in toks:
            a, x = adv[i], logp[i][t] - old[i][t]
            r = seq_r if cfg.importance_level == "sequence" else math.exp(x)
            if cfg.importance_level == "token":
                ratios.append(r)
            low, high, cap = _clip_counts(r, x, a, cfg)
            n_low, n_high, n_cap = n_low + low, n_high + high, n_cap + cap
            iw = 1.0 if isw is None else isw[i][t]
            n_masked += iw == 0
            on = 1.0 if pg is None else float(pg[i][t])
            chosen = bool(sel is not None and sel[i][t])
            n_sel += chosen
            if geo:
                loss -= w * iw * on * geo_s
                geo_weight += w * iw * on
            else:
                value, d_r, d_lp = _surrogate(r, a, logp[i][t], cfg, x, chosen)
                loss -= w * iw * on * value
                grad[i][t] -= w * iw * on * d_lp
                if cfg.importance_level == "token":
                    grad[i][t] -= w * iw * on * d_r * r  # d r / d logp = r
                else:
                    d_seq -= w * iw * on * d_r
            if cfg.beta > 0:
                kl, d_kl = _kl_and_grad(cfg.kl_estimator, ref[i][t] - logp[i][t])
                loss += w * cfg.beta * kl
                grad[i][t] += w * cfg.beta * d_kl
                kl_sum += kl
            if ent is not None:
                loss -= w * coef * ent[i][t]
                d_ent[i][t] = -w * coef
                ent_sum += ent[i][t]
        for k, t in enumerate(toks):  # s_i = exp(mean_t (logp - old)): d s_i / d logp_t = s_i / L_i
            grad[i][t] += d_seq * seq_r / len(toks)
            if geo:
                grad[i][t] -= geo_weight * geo_d[k]
    n = max(total_tokens, 1)
    stats = {"kl": kl_sum / n, "clip/low_frac": n_low / n, "clip/high_frac": n_high / n}
    stats.update(
        {"ratio/mean": sum(ratios) / len(ratios), "ratio/min": min(ratios), "ratio/max": max(ratios)}
    )
    stats.update({"tokens": float(total_tokens), "clip/cap_frac": n_cap / n, "entropy": ent_sum / n})
    stats.update({"clip/cov_frac": n_sel / n, "engine_is/masked_frac": n_masked / n})
    if ent is not None:
        stats["d_entropy"] = d_ent
    return loss, grad, stats


def _random_batch(B=8, T=T_MAX, seed=2):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 - 0.05
    # log-ratios: a shift per completion (so GSPO's sequence ratios spread too) plus noise per
    # token, ratios from ~0.4 to ~2.5: the clips bite on both sides
    shift = 0.3 * torch.randn(B, 1, generator=gen, dtype=torch.float64)
    logps = old + shift + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[2] = False  # one fully masked row
    mask[0, 1] = False  # and a hole inside a completion
    return logps, old, ref, adv, mask


COMBOS = list(itertools.product(AGGS, LEVELS, ("k1", "k2", "k3"), (0.0, 0.04), (None, 0.28)))


@pytest.mark.parametrize("aggregation,level,estimator,beta,eps_high", COMBOS)
def test_every_option_matches_loop_reference(aggregation, level, estimator, beta, eps_high):
    cfg = LossConfig(0.2, eps_high, beta, estimator, aggregation, level, max_completion_length=T_MAX + 3)
    logps, old, ref, adv, mask = _random_batch()
    logps.requires_grad_()
    loss, stats = policy_loss(logps, old, ref, adv, mask, cfg)
    loss.backward()
    rows = [x.tolist() for x in (logps.detach(), old, ref, adv, mask.long())]
    ref_loss, ref_grad, ref_stats = _reference(*rows, cfg)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref_loss) < 1e-10
    assert torch.allclose(logps.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=0, atol=1e-10)
    got = stats.to_dict()
    for name, value in ref_stats.items():
        assert got[name] == pytest.approx(value, abs=1e-10), name
    # the inputs are spread wide enough to exercise both clips
    assert got["clip/low_frac"] > 0 and got["clip/high_frac"] > 0


@pytest.mark.parametrize("aggregation,level", list(itertools.product(AGGS, LEVELS)))
def test_micro_batches_with_shared_denominator_add_up(aggregation, level):
    cfg = LossConfig(
        epsilon_high=0.28, aggregation=aggregation, importance_level=level, max_completion_length=12
    )
    logps, old, ref, adv, mask = _random_batch(B=7, seed=1)
    full_in = logps.clone().requires_grad_()
    full, _ = policy_loss(full_in, old, ref, adv, mask, cfg)
    full.backward()
    parts = [slice(0, 3), slice(3, 4), slice(4, 7)]  # ragged: 3, 1 and 3 completions
    denominator = sum(aggregation_units(mask[p], aggregation) for p in parts)
    micro_in = logps.clone().requires_grad_()
    total = sum(policy_loss(micro_in[p], old[p], ref[p], adv[p], mask[p], cfg, denominator)[0] for p in parts)
    total.backward()
    assert abs(total.item() - full.item()) < 1e-12
    assert torch.allclose(micro_in.grad, full_in.grad, rtol=0, atol=1e-12)
    # A plain float denominator works the same way.
    as_float = policy_loss(logps, old, ref, adv, mask, cfg, float(denominator))[0]
    assert abs(as_float.item() - full.item()) < 1e-12


@pytest.mark.parametrize("aggregation,level", list(itertools.product(AGGS, LEVELS)))
def test_statistics_of_any_split_combine_to_the_whole_batchs(aggregation, level):
    """Every logged statistic of micro-batches, combined (``combine_stats``), equals the whole batch's and
    the float64 loop reference's: sums add, means are formed after summing, min and max are extrema.
    One part is a fully masked row (no ratio at all: it must not pull the min or max to 0)."""
    cfg = LossConfig(0.2, 0.28, 0.04, "k3", aggregation, level, max_completion_length=12)
    logps, old, ref, adv, mask = _random_batch(B=7, seed=1)
    full = policy_loss(logps, old, ref, adv, mask, cfg)[1].to_dict()
    denominator = aggregation_units(mask, aggregation)
    for cuts in ([slice(0, 7)], [slice(0, 2), slice(2, 3), slice(3, 7)], [slice(i, i + 1) for i in range(7)]):
        parts = [policy_loss(logps[p], old[p], ref[p], adv[p], mask[p], cfg, denominator)[1] for p in cuts]
        got = combine_stats(parts).to_dict()
        assert got.keys() == full.keys() == LOGGED_STATS.keys()
        for name in full:
            assert got[name] == pytest.approx(full[name], abs=1e-12), (name, len(cuts))
    ref_stats = _reference(*[x.tolist() for x in (logps, old, ref, adv, mask.long())], cfg)[2]
    for name, value in ref_stats.items():
        if level == "token" or not name.startswith("ratio"):
            assert full[name] == pytest.approx(value, abs=1e-10), name
    # The old averaging of micro-batch values would be wrong here: loss/policy sums, it is not a mean.
    singles = [policy_loss(logps[p], old[p], ref[p], adv[p], mask[p], cfg, denominator)[1] for p in cuts]
    mean_of_parts = sum(s.to_dict()["loss/policy"] for s in singles) / len(singles)
    assert abs(mean_of_parts - full["loss/policy"]) > 1e-3


# ---------------------------------------------------------------------------- edge cases


def test_beta_positive_without_reference_raises():
    logps, old, _, adv, mask = _random_batch()
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, None, adv, mask, LossConfig(beta=0.04))


def test_beta_zero_without_reference_works_and_reports_no_kl():
    logps, old, _, adv, mask = _random_batch()
    loss, stats = policy_loss(logps, old, None, adv, mask, LossConfig(beta=0.0))
    assert torch.isfinite(loss) and stats.kl_sum.item() == 0.0


def test_k3_is_nonnegative_everywhere():
    log_r = torch.randn(100_000, dtype=torch.float64) * 5
    assert (KL_ESTIMATORS["k3"](log_r) >= 0).all()
    logps, old, ref, adv, mask = _random_batch()
    _, stats = policy_loss(logps, old, ref, adv, mask, LossConfig(beta=0.04))
    assert stats.kl_sum.item() > 0


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_on_policy_loss_is_mean_of_minus_advantage_and_gradient_is_policy_gradient(aggregation, beta):
    # old_logps None: rho = 1 in value, so the loss is AGG[-A_i + beta KL] and the gradient of the
    # surrogate is the REINFORCE form -A_i * d logp (weighted by the aggregation).
    cfg = LossConfig(beta=beta, aggregation=aggregation, max_completion_length=T_MAX)
    logps, _, ref, adv, mask = _random_batch()
    logps.requires_grad_()
    loss, stats = policy_loss(logps, None, ref, adv, mask, cfg)
    loss.backward()
    kl_cfg = SimpleNamespace(**{**vars(cfg), "importance_level": "token"})
    x = logps.detach()
    expected_loss, expected_grad, _ = _reference(*[v.tolist() for v in (x, x, ref, adv, mask.long())], kl_cfg)
    B, lengths = mask.shape[0], mask.sum(1).clamp(min=1).double()
    weight = {  # the aggregation's weight per token
        "token_mean": torch.full((B,), 1 / mask.sum().item(), dtype=torch.float64),
        "seq_mean_token_mean": 1 / (B * lengths),
        "seq_mean_token_sum_norm": torch.full((B,), 1 / (B * T_MAX), dtype=torch.float64),
    }[aggregation]
    minus_a = (-adv * weight * mask.sum(1)).sum()
    assert stats.policy_loss.item() == pytest.approx(minus_a.item(), abs=1e-12)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    pg = -(adv * weight)[:, None] * mask
    assert torch.allclose(logps.grad - beta * _kl_grad(logps.detach(), ref, mask, weight), pg, atol=1e-12)
    assert torch.allclose(logps.grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-12)
    assert stats.to_dict()["ratio/mean"] == 1.0 and stats.clip_low.item() == 0.0


def _kl_grad(logps, ref, mask, weight):
    # d k3 / d logp = -(exp(ref - logp) - 1), weighted like the loss
    return -(torch.exp(ref - logps) - 1) * weight[:, None] * mask


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_masked_rows_and_padding_give_no_nan(level, aggregation):
    cfg = LossConfig(aggregation=aggregation, importance_level=level, max_completion_length=T_MAX)
    logps, old, ref, adv, mask = _random_batch()
    logps = torch.where(mask, logps, -torch.inf).requires_grad_()  # padding may hold anything
    old = torch.where(mask, old, torch.nan)
    loss, stats = policy_loss(logps, old, ref, adv, mask, cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert (logps.grad[~mask] == 0).all()
    assert all(math.isfinite(v) for v in stats.to_dict().values())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_all_rows_masked_gives_zero_loss_zero_grad_finite_stats(level, aggregation):
    cfg = LossConfig(aggregation=aggregation, importance_level=level, max_completion_length=T_MAX)
    logps, old, ref, adv, mask = _random_batch()
    logps.requires_grad_()
    loss, stats = policy_loss(logps, old, ref, adv, torch.zeros_like(mask), cfg)
    loss.backward()
    assert loss.item() == 0.0 and (logps.grad == 0).all()
    assert stats.to_dict() == dict.fromkeys(stats.to_dict(), 0.0)


def test_stats_are_detached_scalars_with_metric_names():
    logps, old, ref, adv, mask = _random_batch()
    logps.requires_grad_()
    loss, stats = policy_loss(logps, old, ref, adv, mask, LossConfig())
    assert isinstance(stats, LossStats) and loss.requires_grad
    assert all(v.dim() == 0 and not v.requires_grad for v in stats)
    assert list(stats.to_dict()) == [
        "loss/policy",
        "kl",
        "clip/low_frac",
        "clip/high_frac",
        "clip/cap_frac",
        "ratio/mean",
        "ratio/min",
        "ratio/max",
        "tokens",
        "entropy",
        "clip/cov_frac",
        "engine_is/masked_frac",
    ]
    assert stats.tokens.item() == mask.sum().item()


def test_reads_any_config_object_and_rejects_unknown_options():
    logps, old, ref, adv, mask = _random_batch()
    duck = SimpleNamespace(**vars(LossConfig()))
    assert (
        policy_loss(logps, old, ref, adv, mask, duck)[0].item()
        == policy_loss(logps, old, ref, adv, mask, LossConfig())[0].item()
    )
    bad_values = [
        ("aggregation", "mean"),
        ("importance_level", "group"),
        ("kl_estimator", "k4"),
        ("objective", "ppo"),
    ]
    for field, bad in bad_values:
        with pytest.raises(ValueError, match=field):
            policy_loss(logps, old, ref, adv, mask, SimpleNamespace(**{**vars(duck), field: bad}))
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, ref, adv, mask, LossConfig(aggregation="seq_mean_token_sum_norm"))


def test_bf16_log_probs_are_promoted():
    logps, old, ref, adv, mask = _random_batch()
    loss, _ = policy_loss(
        logps.bfloat16(), old.bfloat16(), ref.bfloat16(), adv.bfloat16(), mask, LossConfig()
    )
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------------------- engine importance sampling


def _engine_weights_loop(old, eng, mask, cap, level="token", mode="truncate"):
    """w = pi_old / mu per token (or per completion: the product over its tokens), then min(w, C)
    (truncate) or 0 where w > C (mask); 1 off the mask. Plain floats, one token at a time."""
    out = []
    for ro, re, rm in zip(old, eng, mask):
        seq = math.exp(sum(o - e for o, e, m in zip(ro, re, rm) if m))
        row = []
        for o, e, m in zip(ro, re, rm):
            w = math.exp(o - e) if level == "token" else seq
            w = min(w, cap) if mode == "truncate" else (0.0 if w > cap else w)
            row.append(w if m else 1.0)
        out.append(row)
    return out


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("mu", [1, 2])
def test_behaviour_correction_loss_and_gradient_match_float64_loop(level, mode, mu):
    """The corrected loss (w = pi_old / mu per token or per completion, truncated or masked at C) and
    its gradient equal a per-token float64 loop; mu = 1: pi_old is the current policy (detached),
    mu = 2: an older one. The cap bites in every case, and masking drops tokens truncation keeps."""
    cfg = LossConfig(0.2, 0.28, 0.04, "k3", "seq_mean_token_mean", "token")
    logps, old, ref, adv, mask = _random_batch()
    gen = torch.Generator().manual_seed(7)
    behaviour = (logps if mu == 1 else old).detach()
    # Per completion a shift (so sequence weights spread both sides of C) plus noise per token.
    eng = behaviour + 0.15 * torch.randn(8, 1, generator=gen, dtype=torch.float64)
    eng = eng + 0.3 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    cap = 1.5
    w = engine_is_weights(behaviour, eng, mask, cap, level, mode)
    want = _engine_weights_loop(behaviour.tolist(), eng.tolist(), mask.tolist(), cap, level, mode)
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    if mode == "truncate":
        assert (w[mask] == cap).any()
    else:
        assert (w[mask] == 0).any() and (w[mask] <= cap).all()
    logps.requires_grad_()
    loss, _ = policy_loss(logps, None if mu == 1 else old, ref, adv, mask, cfg, is_weights=w)
    loss.backward()
    old_rows = behaviour.tolist()
    rows = [logps.detach().tolist(), old_rows, ref.tolist(), adv.tolist(), mask.long().tolist()]
    ref_loss, ref_grad, _ = _reference(*rows, cfg, isw=want)
    assert abs(loss.item() - ref_loss) < 1e-10
    assert torch.allclose(logps.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=0, atol=1e-10)


def test_sequence_weights_do_not_overflow():
    """A long completion's summed log-ratio (here 900) would overflow exp: truncation caps it first."""
    mask = torch.ones(1, 300, dtype=torch.bool)
    old, eng = torch.zeros(1, 300), torch.full((1, 300), -3.0)
    w = engine_is_weights(old, eng, mask, 2.0, "sequence", "truncate")
    assert torch.equal(w, torch.full_like(w, 2.0))
    assert torch.equal(engine_is_weights(old, eng, mask, 2.0, "sequence", "mask"), torch.zeros_like(w))


def test_engine_is_weights_match_loop_and_are_truncated():
    _, old, _, _, mask = _random_batch()
    gen = torch.Generator().manual_seed(5)
    eng = (old + 0.5 * torch.randn(old.shape, generator=gen, dtype=torch.float64)).requires_grad_()
    w = engine_is_weights(old, eng, mask, cap=2.0)
    expected = torch.tensor(
        _engine_weights_loop(old.tolist(), eng.tolist(), mask.tolist(), 2.0), dtype=torch.float64
    )
    assert w.dtype == torch.float64 and not w.requires_grad
    assert torch.allclose(w, expected, rtol=0, atol=1e-12)
    assert (w[mask] == 2.0).any() and (w[mask] < 1.0).any()  # the cap bites, and weights go below 1
    assert torch.equal(w[~mask], torch.ones_like(w[~mask]))


@pytest.mark.parametrize("level", LEVELS)
def test_engine_is_weights_scale_each_tokens_surrogate_like_the_loop(level):
    """w multiplies the clipped surrogate of its token (not the KL term); loss and gradient vs float64 loops."""
    cfg = LossConfig(0.2, 0.28, 0.04, "k3", "seq_mean_token_mean", level)
    logps, old, ref, adv, mask = _random_batch()
    gen = torch.Generator().manual_seed(6)
    eng = old + 0.4 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    w = engine_is_weights(old, eng, mask, cap=2.0)
    logps.requires_grad_()
    loss, _ = policy_loss(logps, old, ref, adv, mask, cfg, is_weights=w)
    loss.backward()
    rows = [x.tolist() for x in (logps.detach(), old, ref, adv, mask.long())]
    isw = _engine_weights_loop(old.tolist(), eng.tolist(), mask.tolist(), 2.0)
    ref_loss, ref_grad, _ = _reference(*rows, cfg, isw=isw)
    assert abs(loss.item() - ref_loss) < 1e-10
    assert torch.allclose(logps.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=0, atol=1e-10)
    plain, _ = policy_loss(logps.detach(), old, ref, adv, mask, cfg)
    assert abs(plain.item() - loss.item()) > 1e-3  # the weights change the loss


# ---------------------------------------------------------------------------- issue 30: CISPO, dual-clip,
# two-sided delta, entropy bonus and top-entropy tokens

VARIANTS = {  # name -> the LossConfig fields it sets
    "dual_clip": {"clip_ratio_c": 1.6},  # low enough that the random batch's ratios reach it
    "delta": {"delta": 1.5},
    "dual_clip_and_delta": {"clip_ratio_c": 1.9, "delta": 1.5},
    "cispo": {"objective": "cispo", "epsilon": 1.0},
    "cispo_bounded": {"objective": "cispo", "epsilon": 0.2},
    # issue 44
    "sapo": {"objective": "sapo", "tau_pos": 1.0, "tau_neg": 1.05},
    "sapo_steep": {"objective": "sapo", "tau_pos": 3.0, "tau_neg": 0.5},
    "gpg": {"objective": "gpg"},
    "clip_cov": {"objective": "clip_cov"},
    "kl_cov": {"objective": "kl_cov", "ppo_kl_coef": 0.3},
    "geo_mean": {"objective": "geo_mean", "epsilon": 0.4, "epsilon_high": 0.4},
    "geo_mean_narrow": {"objective": "geo_mean", "epsilon": 0.1, "epsilon_high": 0.2},
}
TOKEN_ONLY = ("clip_cov", "kl_cov", "geo_mean")  # written for token ratios (validate refuses sequence)


def _cov_mask(B=8, T=T_MAX, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=gen) < 0.3  # stands in for core.covariance's choice


def _entropy_and_pg(B=8, T=T_MAX, seed=4):
    gen = torch.Generator().manual_seed(seed)
    ent = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    return ent, ent >= 0.8  # about 60 % of the tokens get the policy gradient


def _cases(variants):
    """(variant, aggregation, level) for every pair the config allows (no sequence level for TOKEN_ONLY)."""
    return [
        (v, agg, level)
        for v, agg, level in itertools.product(variants, AGGS, LEVELS)
        if not (level == "sequence" and v.startswith(TOKEN_ONLY))
    ]


@pytest.mark.parametrize("entropy_coef,top_entropy", [(0.0, False), (0.05, False), (0.05, True)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("variant,aggregation,level", _cases(VARIANTS))
def test_new_options_match_loop_reference(variant, aggregation, level, beta, entropy_coef, top_entropy):
    """Each new row of the objective table, with every aggregation, ratio level and KL weight, with and
    without the entropy bonus and the top-entropy token mask: loss, d loss / d logp, d loss / d H and the
    statistics equal the float64 loop's."""
    fields = {"epsilon": 0.2, "epsilon_high": 0.28, **VARIANTS[variant]}
    cfg = LossConfig(
        beta=beta, aggregation=aggregation, importance_level=level, max_completion_length=T_MAX + 3,
        entropy_coef=entropy_coef, **fields,
    )  # fmt: skip
    logps, old, ref, adv, mask = _random_batch()
    adv[5] = 0.0  # A = 0: GMPO's sign is 0, SAPO's tau the negative one
    ent, pg = _entropy_and_pg()
    logps.requires_grad_()
    ent.requires_grad_()
    pg = pg if top_entropy else None
    sel = _cov_mask() if variant.startswith(("clip_cov", "kl_cov")) else None
    loss, stats = policy_loss(logps, old, ref, adv, mask, cfg, entropy=ent, pg_mask=pg, cov_mask=sel)
    loss.backward()
    rows = [x.tolist() for x in (logps.detach(), old, ref, adv, mask.long())]
    pg_rows = None if pg is None else pg.long().tolist()
    sel_rows = None if sel is None else sel.long().tolist()
    ref_loss, ref_grad, ref_stats = _reference(
        *rows, cfg, ent=ent.detach().tolist(), pg=pg_rows, sel=sel_rows
    )
    assert abs(loss.item() - ref_loss) < 1e-10
    assert torch.allclose(logps.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=0, atol=1e-10)
    d_ent = torch.tensor(ref_stats.pop("d_entropy"), dtype=torch.float64)
    assert torch.allclose(ent.grad, d_ent, rtol=0, atol=1e-12)
    got = stats.to_dict()
    for name, value in ref_stats.items():
        assert got[name] == pytest.approx(value, abs=1e-10), name
    assert got["entropy"] > 0
    if level == "token" and variant.startswith(("dual", "delta")):
        assert got["clip/cap_frac"] > 0  # the negative-advantage bound bites somewhere
    if variant.startswith("geo_mean"):
        assert got["clip/low_frac"] > 0 and got["clip/high_frac"] > 0  # the log-space clip bites both sides
    if sel is not None:
        assert 0 < got["clip/cov_frac"] < 1


def test_worked_dual_clip_and_delta_bound_negative_advantages():
    # 2.0/0.5 = 4.0, A=-1: PPO's min(-4.0, clip(4.0) * -1 = -1.2) = -4.0, gradient alive;
    #   dual-clip c=3: max(-4.0, 3 * -1) = -3.0 (constant: no gradient);
    #   delta=3: min(min(4.0, 3) * -1, -1.2) = -3.0, the same value (delta > 1 + epsilon_high).
    # 1.0/0.5 = 2.0, A=-1: min(-2.0, -1.2) = -2.0 under all three (below the bound): d/dlogp of -S = 2/2
    # token_mean loss = -(S1 + S2) / 2
    loss, stats, grad = _one_token_rows([2.0, 1.0], [0.5, 0.5], [-1.0, -1.0], epsilon=0.2)
    assert loss.item() == pytest.approx((4.0 + 2.0) / 2, abs=1e-12)
    assert grad.tolist() == pytest.approx([4.0 / 2, 2.0 / 2], abs=1e-12)  # d(-r A / 2) / dlogp = -r A / 2
    for bound in ({"clip_ratio_c": 3.0}, {"delta": 3.0}):
        loss, stats, grad = _one_token_rows([2.0, 1.0], [0.5, 0.5], [-1.0, -1.0], epsilon=0.2, **bound)
        assert loss.item() == pytest.approx((3.0 + 2.0) / 2, abs=1e-12)
        assert grad.tolist() == pytest.approx([0.0, 2.0 / 2], abs=1e-12)
        assert stats.to_dict()["clip/cap_frac"] == pytest.approx(0.5)
    # the seed's ratios are untouched by either bound: 1.8 -> 1.2 (A>0), 0.4 -> 0.8 (A<0), 1.4 -> 1.2
    loss, _, _ = _one_token_rows([0.9, 0.2, 0.7], [0.5] * 3, [1.0, -1.0, 1.0], epsilon=0.2, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(-1.6 / 3, abs=1e-12)


def test_cispo_gives_gradient_to_a_clipped_token_where_grpo_gives_none():
    # The seed's 0.9/0.5 = 1.8 with A=+1 at epsilon 0.2: GRPO's clip picks the constant 1.2 A: gradient 0.
    # CISPO: S = sg(clip(1.8, 0, 1.2)) * A * log pi = 1.2 * log 0.9; d(-S)/dlogp = -1.2 (one token).
    _, _, grpo_grad = _one_token_rows([0.9], [0.5], [1.0], epsilon=0.2)
    loss, stats, cispo_grad = _one_token_rows(
        [0.9], [0.5], [1.0], epsilon=1.0, epsilon_high=0.2, objective="cispo"
    )
    assert grpo_grad.tolist() == [0.0]
    assert cispo_grad.tolist() == pytest.approx([-1.2], abs=1e-12)
    assert loss.item() == pytest.approx(-1.2 * math.log(0.9), abs=1e-12)
    assert stats.to_dict()["clip/high_frac"] == 1.0
    # and 0.2/0.5 = 0.4 with A=-1: epsilon 1 sets no lower bound (weight 0.4), epsilon 0.2 lifts it to 0.8
    _, _, free = _one_token_rows([0.2], [0.5], [-1.0], epsilon=1.0, epsilon_high=0.2, objective="cispo")
    _, _, floor = _one_token_rows([0.2], [0.5], [-1.0], epsilon=0.2, objective="cispo")
    assert free.tolist() == pytest.approx([0.4]) and floor.tolist() == pytest.approx([0.8])


def test_entropy_coef_without_entropy_raises():
    logps, old, _, adv, mask = _random_batch()
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logps, old, None, adv, mask, LossConfig(beta=0.0, entropy_coef=0.01))


@pytest.mark.parametrize("variant,aggregation,level", _cases(["plain", *VARIANTS]))
def test_new_options_micro_batches_add_up_and_rows_leave_the_denominator(variant, aggregation, level):
    """With the entropy bonus, the top-entropy mask (fixed per step, sliced per micro-batch) and each
    new objective, ragged micro-batches with the whole batch's denominator give the full batch's loss
    and gradients. Rows left out of the loss (mask_truncated) leave every denominator: the loss equals
    that of the batch without them."""
    fields = {"epsilon_high": 0.28, **VARIANTS.get(variant, {})}
    cfg = LossConfig(
        aggregation=aggregation, importance_level=level, max_completion_length=12, entropy_coef=0.05, **fields
    )
    logps, old, ref, adv, mask = _random_batch(B=7, seed=1)
    ent, pg = _entropy_and_pg(B=7)
    sel = _cov_mask(B=7)
    full_in, full_ent = logps.clone().requires_grad_(), ent.clone().requires_grad_()
    full, _ = policy_loss(full_in, old, ref, adv, mask, cfg, entropy=full_ent, pg_mask=pg, cov_mask=sel)
    full.backward()
    parts = [slice(0, 3), slice(3, 4), slice(4, 7)]
    denominator = sum(aggregation_units(mask[p], aggregation) for p in parts)
    micro_in, micro_ent = logps.clone().requires_grad_(), ent.clone().requires_grad_()
    total = sum(
        policy_loss(
            micro_in[p],
            old[p],
            ref[p],
            adv[p],
            mask[p],
            cfg,
            denominator,
            entropy=micro_ent[p],
            pg_mask=pg[p],
            cov_mask=sel[p],
        )[0]
        for p in parts
    )
    total.backward()
    assert abs(total.item() - full.item()) < 1e-12
    assert torch.allclose(micro_in.grad, full_in.grad, rtol=0, atol=1e-12)
    assert torch.allclose(micro_ent.grad, full_ent.grad, rtol=0, atol=1e-12)
    # rows 1 and 5 truncated: masked out and not counted == the batch of the other five rows
    keep = torch.tensor([True, False, True, True, True, False, True])
    cut_mask = mask & keep[:, None]
    units = aggregation_units(cut_mask, aggregation, rows=keep)
    cut = policy_loss(logps, old, ref, adv, cut_mask, cfg, units, entropy=ent, pg_mask=pg, cov_mask=sel)[0]
    alone = policy_loss(
        logps[keep], old[keep], ref[keep], adv[keep], mask[keep], cfg, entropy=ent[keep], pg_mask=pg[keep],
        cov_mask=sel[keep],
    )[0]  # fmt: skip
    assert abs(cut.item() - alone.item()) < 1e-12
    # without rows=, the seq_mean modes would still count the two rows: a different loss
    if aggregation != "token_mean":
        assert units.item() == 5 and aggregation_units(cut_mask, aggregation).item() == 7


def _quantile_loop(values, q):
    """torch.quantile's linear interpolation, written out: position q (n - 1) in the sorted values."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8, 0.999])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_entropy_threshold_is_the_quantile_and_keeps_the_top_fraction(rho, n):
    gen = torch.Generator().manual_seed(n)
    values = torch.rand(n, generator=gen, dtype=torch.float64)
    threshold = entropy_threshold(values, rho)
    assert threshold.item() == pytest.approx(_quantile_loop(values.tolist(), 1 - rho), abs=1e-15)
    assert threshold.item() == pytest.approx(torch.quantile(values, 1 - rho).item(), abs=1e-15)
    kept = int((values >= threshold).sum())
    # the top rho fraction, up to one token of interpolation
    assert abs(kept - rho * n) <= 1 + 1e-9 and kept >= 1


def test_entropy_threshold_edges():
    v = torch.tensor([0.3, 0.1, 0.2])
    assert entropy_threshold(v, 1.0).item() == -math.inf  # every token
    assert entropy_threshold(v[:0], 0.2).item() == -math.inf
    assert entropy_threshold(torch.tensor([0.5, 0.5, 0.5, 0.5]), 0.2).item() == 0.5  # ties: all kept
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            entropy_threshold(v, bad)
