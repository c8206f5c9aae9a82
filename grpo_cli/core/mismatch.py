r"""The behaviour-policy correction (``algo.engine_is``): weights, masks and rejections from pi_old / mu.

When another engine sampled the completions (vLLM), its probabilities mu can differ from the
trainer's pi_old: other kernels and precision, and with ``rollout.max_staleness`` >= 1 weights up to
that many steps older. With w = pi_old / mu of each sampled token (pi_old the trainer's recomputed
log-prob, the proximal policy), ``engine_is.cap`` = C turns on one of three modes:

    truncate  w_{i,t} = clip(pi_old / mu, low, C)             (level=token; TRL's
              w_i     = clip(prod_t pi_old / mu, low, C)      vllm_importance_sampling_correction,
              (low null: min(w, C))                           verl's rollout IS: TIS)
    mask      w where low <= w <= C, else 0: the token (or the whole completion) gives no loss but
              stays in the denominators; with ``low`` a two-sided mask (IcePop, Ring-1T arXiv
              2510.18855: tokens whose ratio left [low, high] carry no gradient; prime-rl, NeMo-RL)
    reject    level=sequence only: a completion whose statistic s_i falls outside [low, C] leaves the
              loss and every denominator, as if never sampled; the rest keep w = 1 (verl's rollout
              rejection sampling, ``rollout_rs``). ``engine_is.statistic`` picks s_i over the
              completion's tokens with x_t = log pi_old / mu:
                  sum       exp(sum_t x_t), the product of the ratios       (verl seq_sum_k1)
                  geo_mean  exp(mean_t x_t), their geometric mean           (verl seq_mean_k1)
                  mean_k3   mean_t (e^x_t - 1 - x_t), k3's estimate of KL(mu || pi_old), >= 0, so only
                            the upper bound C applies                       (verl seq_mean_k3)
              verl's k1 thresholds bound log(mu / pi_old), the other way round: [low, C] here is verl's
              "1/C_1/low", and the two agree only where low * C = 1 (TRL bounds pi_old / mu, as here).

The weights multiply each token's surrogate in ``core.loss`` (the KL term is not weighted); the
rejection is taken once per step, before the denominators are counted (``commands.selections``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SEQUENCE_STATISTICS", "engine_is_weights", "rejected_sequences"]


def engine_is_weights(
    old_logps: Tensor,
    engine_logps: Tensor,
    mask: Tensor,
    cap: float,
    level: str = "token",
    mode: str = "truncate",
    low: float | None = None,
) -> Tensor:
    """Importance weights w = pi_old / mu of the behaviour policy mu, truncated or masked, detached.

    Args:
        old_logps: [B, T] log pi_old (the trainer's log-probs of the sampled tokens: the proximal policy).
        engine_logps: [B, T] log mu (the sampling engine's log-probs of the same tokens, possibly from
            weights up to ``rollout.max_staleness`` steps older).
        mask: [B, T] bool or 0/1, true on the model's tokens; masked positions get weight 1.
        cap: C > 0 (TRL and verl default to 2).
        level: token (w_{i,t} per token) or sequence (w_i = exp(sum_t log pi_old / mu) over the
            completion's tokens, the same for each of them).
        mode: truncate (clip(w, low, C)) or mask (w where low <= w <= C, else 0: no loss from that token
            or completion).
        low: the lower bound (IcePop's two-sided mask; TRL's vllm_importance_sampling_clip_min); None: none.

    Returns:
        [B, T] weights in [0, C], float32 (float64 for float64 inputs), no gradient.
    """
    dtype = torch.promote_types(old_logps.dtype, torch.float32)
    mask = mask.bool()
    log_w = torch.where(mask, old_logps.detach().to(dtype) - engine_logps.detach().to(dtype), 0.0)
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    elif level != "token":
        raise ValueError(f"engine_is.level={level!r}: expected one of ['sequence', 'token']")
    log_cap = torch.tensor(float(cap), dtype=dtype).log()
    w = log_w.clamp(max=log_cap).exp()  # clamp first: a sequence's summed log-ratio may overflow exp
    log_low = None if low is None else torch.tensor(float(low), dtype=dtype).log()
    if mode == "truncate":
        if log_low is not None:
            w = log_w.clamp(min=log_low, max=log_cap).exp()
    elif mode == "mask":
        outside = log_w > log_cap
        if log_low is not None:
            outside = outside | (log_w < log_low)
        w = torch.where(outside, 0.0, w)
    else:
        raise ValueError(f"engine_is.mode={mode!r}: expected one of ['mask', 'truncate']")
    return torch.where(mask, w, 1.0)


def _log_product(x: Tensor, m: Tensor) -> Tensor:
    return x.sum(-1)


def _log_geo_mean(x: Tensor, m: Tensor) -> Tensor:
    return x.sum(-1) / m.sum(-1).clamp(min=1)


def _mean_k3(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, torch.expm1(x) - x, 0.0).sum(-1) / m.sum(-1).clamp(min=1)


# statistic -> (its value per completion from x [B, T] (0 off the mask) and the mask, whether it is a
# log-ratio, compared with log C and log low, or a divergence, compared with C alone).
SEQUENCE_STATISTICS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], bool]] = {
    "sum": (_log_product, True),
    "geo_mean": (_log_geo_mean, True),
    "mean_k3": (_mean_k3, False),
}


def rejected_sequences(
    old_logps: Tensor,
    engine_logps: Tensor,
    mask: Tensor,
    cap: float,
    statistic: str = "sum",
    low: float | None = None,
) -> Tensor:
    """[B] bool: the completions whose statistic (``SEQUENCE_STATISTICS``) is above `cap` or below `low`.

    Args: as `engine_is_weights` (the [B, T] log-probs of pi_old and mu, the model-token mask). A
    completion without tokens is never rejected. ``low`` is refused for mean_k3 (a divergence >= 0).
    """
    if statistic not in SEQUENCE_STATISTICS:
        raise ValueError(f"engine_is.statistic={statistic!r}: expected one of {sorted(SEQUENCE_STATISTICS)}")
    reduce, is_log = SEQUENCE_STATISTICS[statistic]
    dtype = torch.promote_types(old_logps.dtype, torch.float32)
    mask = mask.bool()
    x = torch.where(mask, old_logps.detach().to(dtype) - engine_logps.detach().to(dtype), 0.0)
    s = reduce(x, mask)  # [B]
    if not is_log:
        if low is not None:
            raise ValueError(f"engine_is.statistic={statistic} is a divergence (>= 0): it takes no low bound")
        return s > cap
    out = s > math.log(cap)
    if low is not None:
        out = out | (s < math.log(low))
    return out & mask.any(-1)
