r"""The surrogate objectives S_{i,t} of ``core.loss`` (``algo.objective``), one function each.

    clip:     min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)                  PPO / GRPO
              where rho > C and A < 0: C A, with C = clip_ratio_c (dual-clip, Ye et al. 2020,
              arXiv 1912.09729, verl) or delta (two-sided GRPO, INTELLECT-2 arXiv 2505.07291, TRL)
    cispo:    sg(clip(rho, 1 - epsilon, 1 + epsilon_high)) A log pi_theta     MiniMax-M1 (2506.13585)
    sapo:     f_tau(rho) A,  f_tau(r) = sigmoid(tau (r - 1)) 4 / tau,  tau = tau_pos (A > 0) or tau_neg
              (A <= 0): a smooth gate instead of the hard clip; f_tau(1) = 1 and f_tau'(1) = 1, so on
              policy it is the plain policy gradient, and far from 1 the gradient fades (SAPO, Qwen,
              arXiv 2511.20347; verl tau_pos / tau_neg, TRL sapo_temperature_pos / _neg)
    gpg:      A log pi_theta: no ratio, no clip, REINFORCE with the group baseline (GPG, arXiv 2504.02546)
    clip_cov: the clip surrogate, except 0 (no value, no gradient) on the covariance-selected tokens
              (Clip-Cov, "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617; verl)
    kl_cov:   rho A - ppo_kl_coef |log rho| on the covariance-selected tokens, rho A elsewhere, no clip
              (KL-Cov, the same paper; verl)
    geo_mean: A_i exp( mean_t sgn(A_i) min(sgn(A_i) log rho_t, sgn(A_i) clip(log rho_t, -epsilon,
              epsilon_high)) ), the same for every token of o_i: the geometric mean of the token ratios,
              each clipped in log space (GMPO, arXiv 2507.20673; verl geo_mean, where the paper's
              range e^{+-0.4} is epsilon = epsilon_high = 0.4)

Each maps the per-token terms (``Terms``) and the config to the surrogate [B, T] and three [B, T] bool
masks of the tokens whose weight was cut (below, above, at the negative-advantage cap), for the
statistics. The covariance-selected tokens (``core.covariance``) are chosen once per step, outside.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["COVARIANCE_OBJECTIVES", "OBJECTIVES", "TOKEN_LEVEL_OBJECTIVES", "Terms", "clip_range"]


class Terms(NamedTuple):
    """The per-token inputs of a surrogate."""

    ratio: Tensor  # [B, T] rho (broadcast from [B] at importance_level=sequence)
    log_ratio: Tensor  # [B, T] log pi_theta - log pi_old per token, 0 off the mask
    adv: Tensor  # [B, 1] A_i
    mask: Tensor  # [B, T] bool, the completion tokens
    logps: Tensor  # [B, T] log pi_theta, 0 off the mask
    selected: Tensor  # [B, T] bool, the covariance-selected tokens (clip_cov, kl_cov); all false otherwise


def clip_range(cfg: Any) -> tuple[float, float]:
    """(1 - epsilon, 1 + epsilon_high), epsilon_high None meaning epsilon."""
    return 1.0 - cfg.epsilon, 1.0 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)


def _negative_cap(cfg: Any) -> float:
    # Dual-clip's c and the two-sided delta both bound rho for A < 0; with both, the smaller binds.
    bounds = [b for b in (getattr(cfg, "clip_ratio_c", None), getattr(cfg, "delta", None)) if b is not None]
    return min(bounds, default=math.inf)


def _none(t: Terms) -> Tensor:
    return torch.zeros_like(t.mask)


def _clipped_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """min(rho A, clip(rho) A) per token, and C * A where rho > C with A < 0 (dual-clip / delta).

    Written as a choice rather than torch.min: torch.min splits the gradient at ties, and the
    choice makes plain that the clip bites only on the side the advantage points to.
    """
    ratio, adv, mask = t.ratio, t.adv, t.mask
    low, high = clip_range(cfg)
    cap = _negative_cap(cfg)
    clip_low = (ratio < low) & (adv < 0) & mask  # min picks the constant (1 - eps) A
    clip_high = (ratio > high) & (adv > 0) & mask  # min picks the constant (1 + eps_high) A
    # For A < 0 the min follows rho upwards without bound (a token pi_theta now likes far more than
    # pi_old did, pushed down with an ever larger weight); C * A stops it (arXiv 1912.09729, 2505.07291).
    clip_cap = (ratio > cap) & (adv < 0) & mask
    clipped = torch.where(clip_low, low, torch.where(clip_high, high, ratio))
    clipped = torch.where(clip_cap, cap, clipped)
    # The constants carry no gradient: the ratio is cut off from the loss where the clip bites.
    return clipped * adv, clip_low, clip_high, clip_cap


def _cispo_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """sg(clip(rho, 1 - epsilon, 1 + epsilon_high)) * A * log pi_theta per token (CISPO).

    The weight is detached: d S / d log pi = clip(rho) A on every token, clipped or not; the clip only
    bounds how much weight one token gets. Its value is not PPO's (it is A log pi, not about A).
    """
    low, high = clip_range(cfg)
    weight = t.ratio.detach().clamp(min=low, max=high)
    clip_low = (t.ratio < low) & t.mask
    clip_high = (t.ratio > high) & t.mask
    return weight * t.adv * t.logps, clip_low, clip_high, _none(t)


def _sapo_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """f_tau(rho) * A with SAPO's gate f_tau(r) = sigmoid(tau (r - 1)) * 4 / tau.

    d f / d r = 4 sigmoid (1 - sigmoid): 1 at r = 1, falling off on both sides, so a token far from
    pi_old keeps a small gradient instead of none (the hard clip) or an unbounded one. The negative
    side's tau is larger (1.05 against 1.0 in the paper): negative updates fade sooner.
    """
    pos, neg = (
        torch.tensor(float(v), dtype=t.ratio.dtype, device=t.ratio.device) for v in (cfg.tau_pos, cfg.tau_neg)
    )
    tau = torch.where(t.adv > 0, pos, neg)  # [B, 1], in the loss's dtype (1.05 is not a float32)
    gate = torch.sigmoid(tau * (t.ratio - 1.0)) * (4.0 / tau)
    return gate * t.adv, _none(t), _none(t), _none(t)


def _gpg_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """A * log pi_theta (GPG): the policy gradient itself, no importance ratio and no clip."""
    return t.adv * t.logps, _none(t), _none(t), _none(t)


def _clip_cov_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """The clip surrogate with the covariance-selected tokens cut out (value 0, gradient 0); they
    still count in the denominators, as verl multiplies their loss by 0."""
    surrogate, clip_low, clip_high, clip_cap = _clipped_surrogate(t, cfg)
    return torch.where(t.selected, 0.0, surrogate), clip_low, clip_high, clip_cap


def _kl_cov_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """rho A, minus ppo_kl_coef |log rho| on the covariance-selected tokens (KL-Cov: no clip at all;
    the penalty holds the tokens whose log-prob moves most with the advantage near pi_old)."""
    penalty = float(cfg.ppo_kl_coef) * t.log_ratio.abs()
    return t.ratio * t.adv - torch.where(t.selected, penalty, 0.0), _none(t), _none(t), _none(t)


def _geo_mean_surrogate(t: Terms, cfg: Any) -> tuple[Tensor, ...]:
    """GMPO: A_i times the geometric mean over o_i of the token ratios, each clipped in log space to
    [-epsilon, epsilon_high] on the side the advantage points to (the min picks the clipped value
    only where it lowers sgn(A) log rho: PPO's rule in log space), broadcast to o_i's tokens."""
    low = float(cfg.epsilon)
    high = float(cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
    x, adv, mask = t.log_ratio, t.adv, t.mask
    clip_low = (x < -low) & (adv < 0) & mask  # sgn(A) = -1: max(x, clip(x)) picks -low
    clip_high = (x > high) & (adv > 0) & mask  # sgn(A) = +1: min(x, clip(x)) picks high
    # The constants carry no gradient; A = 0 gives sgn 0, so a ratio of 1 and no term at all.
    kept = torch.where(clip_low, -low, torch.where(clip_high, high, x)) * (adv != 0)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    seq_ratio = (torch.where(mask, kept, 0.0).sum(dim=1, keepdim=True) / lengths).exp()  # [B, 1]
    return (seq_ratio * adv).expand_as(x), clip_low, clip_high, _none(t)


OBJECTIVES = {
    "clip": _clipped_surrogate,
    "cispo": _cispo_surrogate,
    "sapo": _sapo_surrogate,
    "gpg": _gpg_surrogate,
    "clip_cov": _clip_cov_surrogate,
    "kl_cov": _kl_cov_surrogate,
    "geo_mean": _geo_mean_surrogate,
}
# The objectives that read the covariance-selected tokens (chosen once per step: ``core.covariance``).
COVARIANCE_OBJECTIVES = ("clip_cov", "kl_cov")
# The objectives written for token ratios (geo_mean makes its own sequence ratio from them; the
# covariance pair selects and penalises single tokens): importance_level=sequence is refused for them.
TOKEN_LEVEL_OBJECTIVES = ("clip_cov", "kl_cov", "geo_mean")
