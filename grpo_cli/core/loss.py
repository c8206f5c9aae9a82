r"""The GRPO objective family as pure tensor functions.

For a prompt q the old policy pi_old samples a group of G completions o_1..o_G with rewards r_i.
Every token t of completion o_i gets the completion's advantage A_i and a ratio rho_{i,t}; the
loss is the negative of

    J(theta) = AGG_{i,t} [ m_{i,t} * S_{i,t} - beta * KL_{i,t}(pi_theta || pi_ref) + c_H * H_{i,t} ]

with
    A_i       = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps), or RLOO, REINFORCE++, OPO, pass@k
                                                                        (`core.advantages`)
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})    (importance_level=token)
              = exp(mean_t log(pi_theta / pi_old))  for every t of o_i         (importance_level=sequence)
    S_{i,t}   = the objective's surrogate (``objective``, ``OBJECTIVES``):
        clip:  min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)                 (PPO / GRPO)
               except where rho > C and A < 0: there C * A (a constant), with
               C = clip_ratio_c (dual-clip, Ye et al. 2020, arXiv 1912.09729; verl's clip_ratio_c)
                 = delta (two-sided clip, INTELLECT-2 arXiv 2505.07291; TRL's delta)
               (the smaller of the two when both are set; both cut the gradient of that token)
        cispo: sg(clip(rho, 1 - epsilon, 1 + epsilon_high)) * A * log pi_theta       (CISPO, MiniMax-M1
               arXiv 2506.13585: the weight is clipped and detached, so a clipped token keeps the
               gradient w A grad log pi where PPO's clip gives it none)
        sapo, gpg, clip_cov, kl_cov, geo_mean: SAPO's soft gate, GPG's plain A log pi, Clip-Cov and
               KL-Cov on the covariance-selected tokens (`core.covariance`), GMPO's geometric mean of
               the clipped token ratios (`core.objectives` has each formula and its paper)
    KL_{i,t}  = k3: pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (k1 and k2 as options)
    H_{i,t}   = entropy of pi_theta(. | q, o_{i,<t}) at the sampling temperature; c_H = entropy_coef
                (verl's entropy_coeff), 0 by default
    m_{i,t}   = 1, or with top_entropy_quantile = rho_H < 1 only the tokens whose entropy is at or above
                the (1 - rho_H) quantile of the step's tokens ("Beyond the 80/20 rule", arXiv 2506.01939;
                TRL's top_entropy_quantile): the others get no policy-gradient term (KL and entropy
                terms still apply, denominators unchanged). `entropy_threshold` finds the quantile.
    AGG       = one of the three aggregations below (how tokens and completions are averaged).

When another engine sampled the completions (vLLM), ``algo.engine_is`` weights each token's surrogate
by a detached w from pi_old / mu (mu: the engine's probabilities), truncated at a cap or masked outside
[low, cap], or rejects whole completions (``core.mismatch``): the term becomes w * S; the KL term is
not weighted. pi_old is the trainer's own recomputed log-prob (the proximal policy: the weights at the
start of the step), so the clip keeps its trust region around the current policy; w only corrects for
having sampled from mu.

Which options reproduce which paper:

- GRPO / DeepSeekMath (arXiv 2402.03300): scale="group", aggregation="seq_mean_token_mean",
  importance_level="token", kl_estimator="k3", beta=0.04, epsilon=0.2 (the defaults).
- DAPO (arXiv 2503.14476): aggregation="token_mean" and a larger epsilon_high ("clip-higher",
  0.28), usually beta=0.
- Dr. GRPO (arXiv 2503.20783): scale="none" and aggregation="seq_mean_token_sum_norm" with
  max_completion_length as the constant divisor, beta=0.
- GSPO (arXiv 2507.18071): importance_level="sequence" (one length-normalised ratio per
  completion, clipped once; the gradient reaches every token of the completion through it).
- CISPO (arXiv 2506.13585): objective="cispo", aggregation="token_mean", beta=0, epsilon=1 (no lower
  bound on the weight, as the paper), epsilon_high tuned (conf/algo/cispo.yaml).
- Dual-clip PPO (arXiv 1912.09729): clip_ratio_c=3; two-sided GRPO (INTELLECT-2): delta=4.
- SAPO (arXiv 2511.20347): objective="sapo", tau_pos=1, tau_neg=1.05, seq_mean_token_mean, beta=0
  (conf/algo/sapo.yaml); GMPO (arXiv 2507.20673): objective="geo_mean", epsilon=epsilon_high=0.4 in
  log space, beta=0 (conf/algo/gmpo.yaml); GPG (arXiv 2504.02546): objective="gpg"; Clip-Cov and
  KL-Cov (arXiv 2505.22617): objective="clip_cov" / "kl_cov" with verl's ratios and bounds.

The dual-clip and delta rows coincide in value whenever the bound exceeds 1 + epsilon_high (delta
must: ``commands.validate``); both are kept, each under the name users bring from verl or TRL.

What it leaves out: PPO's value function (GRPO has none) and a learned or adaptive entropy
coefficient. `policy_loss` returns the loss to minimise (-J) and a `LossStats` record of detached
sums, counts and extrema (`core.stats`: how each combines over micro-batches and ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpo_cli.core.objectives import OBJECTIVES, TOKEN_LEVEL_OBJECTIVES, Terms
from grpo_cli.core.stats import LossStats, loss_stats


@dataclass
class LossConfig:
    """The loss options. `policy_loss` reads these attributes from any object that has them
    (the project's ``AlgoConfig`` uses the same names)."""

    epsilon: float = 0.2  # lower clip range: rho >= 1 - epsilon (PPO/GRPO 0.2)
    epsilon_high: float | None = None  # upper clip range; None means epsilon (DAPO 0.28)
    beta: float = 0.04  # KL weight (DeepSeekMath 0.04); 0 skips the reference entirely
    kl_estimator: str = "k3"  # "k1" | "k2" | "k3"
    aggregation: str = "seq_mean_token_mean"  # | "token_mean" | "seq_mean_token_sum_norm"
    importance_level: str = "token"  # | "sequence" (GSPO)
    max_completion_length: int | None = None  # Dr. GRPO's constant divisor
    objective: str = "clip"  # | "cispo" (MiniMax-M1)
    clip_ratio_c: float | None = None  # dual-clip bound for A < 0 (Ye et al. 2020; verl 3.0); None: off
    delta: float | None = None  # two-sided clip, upper bound for A < 0 (INTELLECT-2; TRL); None: off
    entropy_coef: float = 0.0  # entropy bonus c_H (verl's entropy_coeff); 0: none
    tau_pos: float = 1.0  # SAPO's gate temperature for A > 0
    tau_neg: float = 1.05  # SAPO's gate temperature for A <= 0
    ppo_kl_coef: float = 0.1  # KL-Cov's penalty weight on the selected tokens (verl)


# ---------------------------------------------------------------------------- KL estimators
# Schulman's estimators of KL(pi_theta || pi_ref) from samples of pi_theta, with
# log_r = log pi_ref - log pi_theta per token (http://joschu.net/blog/kl-approx.html).


def _kl_k1(log_r: Tensor) -> Tensor:
    return -log_r


def _kl_k2(log_r: Tensor) -> Tensor:
    return 0.5 * log_r.square()


def _kl_k3(log_r: Tensor) -> Tensor:
    # expm1 keeps the small-|log_r| regime (the usual one) accurate: e^x - 1 - x ~ x^2/2.
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


# ---------------------------------------------------------------------------- importance ratios
# Each takes log(pi_theta / pi_old) per token (0 on masked tokens) and the mask; returns the
# ratio broadcast to [B, T] and the values its statistics are taken over.


def _token_ratio(log_ratio: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ratio = log_ratio.exp()  # [B, T]
    return ratio, ratio, mask > 0


def _sequence_ratio(log_ratio: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # GSPO: s_i = exp(mean_t log ratio), so every token of o_i shares one ratio and one clip.
    lengths = mask.sum(dim=1)  # [B]
    seq_ratio = (log_ratio.sum(dim=1) / lengths.clamp(min=1)).exp()  # [B]
    return seq_ratio[:, None].expand_as(log_ratio), seq_ratio, lengths > 0


IMPORTANCE_LEVELS = {"token": _token_ratio, "sequence": _sequence_ratio}


# ---------------------------------------------------------------------------- aggregations
# Each maps the masked per-token loss [B, T] to (sum of per-unit losses, local unit count);
# the loss is that sum divided by the unit count over the whole batch. Units are tokens for
# token_mean and completions for the seq_mean_* modes.


def _token_mean(per_token: Tensor, mask: Tensor, cfg: Any) -> tuple[Tensor, Tensor]:
    return per_token.sum(), mask.sum()


def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, cfg: Any) -> tuple[Tensor, Tensor]:
    per_seq = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    return per_seq.sum(), torch.tensor(float(mask.shape[0]), dtype=mask.dtype, device=mask.device)


def _seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, cfg: Any) -> tuple[Tensor, Tensor]:
    # Dr. GRPO divides by a constant, so long and short completions weigh the same per token.
    if not cfg.max_completion_length:
        raise ValueError("aggregation='seq_mean_token_sum_norm' needs max_completion_length (Dr. GRPO)")
    per_seq = per_token.sum(dim=1) / cfg.max_completion_length  # [B]
    return per_seq.sum(), torch.tensor(float(mask.shape[0]), dtype=mask.dtype, device=mask.device)


AGGREGATIONS = {
    "seq_mean_token_mean": _seq_mean_token_mean,
    "token_mean": _token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregation_units(mask: Tensor, aggregation: str, rows: Tensor | None = None) -> Tensor:
    """Normalising units in `mask` [B, T] for `aggregation`: masked tokens for token_mean,
    completions for the seq_mean_* modes: every row (fully masked ones included, as TRL counts an
    unjudged completion), or with `rows` [B] bool only the rows it marks (``algo.mask_truncated``
    leaves truncated completions out of every denominator).

    Sum this over micro-batches and ranks to get the `denominator` of `policy_loss`.
    """
    if aggregation == "token_mean":
        return mask.sum().to(torch.float32)
    _choice(AGGREGATIONS, aggregation, "aggregation")
    count = float(mask.shape[0]) if rows is None else float(rows.sum())
    return torch.tensor(count, device=mask.device)


# ---------------------------------------------------------------------------- entropy


def entropy_threshold(entropy: Tensor, quantile: float) -> Tensor:
    """The (1 - quantile) quantile of `entropy` [n] (linear interpolation, as ``torch.quantile``),
    so that the tokens with entropy >= it are the top `quantile` fraction ("Beyond the 80/20 rule").

    Sorting rather than ``torch.quantile``, which refuses more than 2^24 values (a step's tokens can
    be more). -inf for quantile >= 1 (every token) or no values.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"top_entropy_quantile={quantile}: must be in (0, 1]")
    n = entropy.numel()
    if quantile >= 1 or n == 0:
        return entropy.new_tensor(-math.inf)
    values = entropy.reshape(-1).sort().values
    pos = (1.0 - quantile) * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


# ---------------------------------------------------------------------------- the loss


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: Any,
    denominator: float | Tensor | None = None,
    is_weights: Tensor | None = None,
    entropy: Tensor | None = None,
    pg_mask: Tensor | None = None,
    cov_mask: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """The surrogate, minus beta * KL, plus the entropy bonus, aggregated: the loss -J(theta) to minimise.

    Args:
        logps: [B, T] log pi_theta of the sampled tokens (carries the gradient).
        old_logps: [B, T] log pi_old; None means logps.detach() (mu = 1: rho = 1, gradient intact).
        ref_logps: [B, T] log pi_ref; may be None only when cfg.beta == 0.
        advantages: [B] A_i, one per completion.
        mask: [B, T] bool or 0/1, true on completion tokens. Masked-out positions may hold any
            value (even inf/NaN): they are replaced before use, never multiplied by zero.
        cfg: the `LossConfig` fields (any object with them; a missing optional one takes its default).
        denominator: None normalises locally (this batch's tokens, or rows for seq_mean_*); else the
            unit count over the full batch (all micro-batches and ranks; `aggregation_units`), so
            micro-batch losses add up exactly to the full-batch loss. A fully masked row adds nothing
            but counts as a completion in seq_mean_* (as in TRL) unless the denominator leaves it out.
        is_weights: [B, T] detached weights of each token's surrogate (`core.mismatch`); None: 1.
        entropy: [B, T] H of pi_theta per token (`core.logprobs.token_logprobs`), logged when given;
            it must carry its gradient when entropy_coef > 0.
        pg_mask: [B, T] bool, the tokens that get the surrogate (top_entropy_quantile's high-entropy
            tokens); None: every token of `mask`.
        cov_mask: [B, T] bool, the covariance-selected tokens of clip_cov / kl_cov (`core.covariance`).

    Returns:
        (loss, stats): loss a 0-dim tensor in float32 (float64 for float64 inputs).

    Eleven arguments: a pure function of the formula's tensors (log-probs under pi_theta, pi_old, pi_ref,
    the advantages, the mask, the engine weights w, the entropy, the pg and covariance masks) and its
    settings; each option reads its own subset, which one bag would hide.
    """
    coef = float(getattr(cfg, "entropy_coef", 0.0))
    if coef and entropy is None:
        raise ValueError(f"entropy_coef={coef} needs the entropy of each token; pass entropy=")
    dtype = torch.promote_types(logps.dtype, torch.float32)  # never compute the loss in bf16
    mask = mask.bool()
    weights = mask.to(dtype)
    selected = mask & (torch.zeros_like(mask) if cov_mask is None else cov_mask.bool())
    terms = _terms(logps, old_logps, ref_logps, advantages, mask, cfg, is_weights, selected)
    surrogate, kl, clips, ratio_values, ratio_mask = terms
    policy_mask = mask if pg_mask is None else mask & pg_mask.bool()
    ent = torch.zeros_like(kl) if entropy is None else torch.where(mask, entropy.to(dtype), 0.0)
    aggregate = _choice(AGGREGATIONS, cfg.aggregation, "aggregation")
    # DeepSeekMath puts beta * KL inside the per-token sum, so it is aggregated like the surrogate;
    # the entropy bonus likewise (verl adds it with the policy term's aggregation).
    kl_ent = torch.where(mask, float(cfg.beta) * kl - coef * ent, 0.0)
    loss_sum, units = aggregate(torch.where(policy_mask, -surrogate, 0.0) + kl_ent, weights, cfg)
    if denominator is None:
        denominator = units.clamp(min=1)  # an empty batch gives 0, not 0/0
    with torch.no_grad():
        policy = aggregate(torch.where(policy_mask, -surrogate, 0.0), weights, cfg)[0] / denominator
        masked = mask & (torch.zeros_like(mask) if is_weights is None else is_weights == 0)  # w = 0
    stats = loss_stats(policy, kl, *clips, ratio_values, ratio_mask, weights, ent.detach(), selected, masked)
    return loss_sum / denominator, stats


def _terms(logps, old_logps, ref_logps, advantages, mask, cfg, is_weights, selected) -> tuple:
    """Per token [B, T]: the objective's surrogate, the KL estimate (0 when beta = 0), the clip masks
    (low, high, cap); and the ratio's values and mask over its units (for the statistics)."""
    if float(cfg.beta) > 0 and ref_logps is None:
        raise ValueError(
            f"beta={cfg.beta} > 0 needs ref_logps (log-probs under pi_ref); pass them or set beta=0"
        )
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(dtype)
    # pi_old and pi_ref are constants of the objective: no gradient reaches them.
    old_logps = logps.detach() if old_logps is None else old_logps.detach().to(dtype)
    # torch.where, not a product with the mask: padding may hold -inf and inf * 0 is NaN.
    log_ratio = torch.where(mask, logps - old_logps, 0.0)
    importance = _choice(IMPORTANCE_LEVELS, cfg.importance_level, "importance_level")
    ratio, ratio_values, ratio_mask = importance(log_ratio, mask.to(dtype))
    objective = _choice(OBJECTIVES, getattr(cfg, "objective", "clip"), "objective")
    if cfg.importance_level != "token" and getattr(cfg, "objective", "clip") in TOKEN_LEVEL_OBJECTIVES:
        raise ValueError(f"objective={cfg.objective} works on token ratios: importance_level must be token")
    adv = advantages.to(dtype)[:, None]  # [B, 1]
    terms = Terms(ratio, log_ratio, adv, mask, torch.where(mask, logps, 0.0), selected)
    surrogate, *clips = objective(terms, cfg)
    if is_weights is not None:
        surrogate = surrogate * is_weights.detach().to(dtype)
    kl = torch.zeros_like(logps)  # beta == 0: no reference pass, no KL term
    if float(cfg.beta) > 0:
        log_r = torch.where(mask, ref_logps.detach().to(dtype) - logps, 0.0)  # log pi_ref / pi_theta
        kl = _choice(KL_ESTIMATORS, cfg.kl_estimator, "kl_estimator")(log_r)
    return surrogate, kl, tuple(clips), ratio_values, ratio_mask


def _choice(table: dict[str, Any], key: str, name: str) -> Any:
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"{name}={key!r}: expected one of {sorted(table)}") from None
