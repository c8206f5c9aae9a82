"""The update's logged statistics and how each one combines over micro-batches and ranks.

Every statistic is kept as sums, counts and extrema while a step runs (``LossStats``), so that any split
of the step's batch, into micro-batches and over ranks, combines into exactly the whole batch's values:
``STAT_COMBINE`` says how each field combines, ``LOGGED_STATS`` how each logged loss statistic is formed
from the combined fields, ``UPDATE_STATS`` how the update's other statistics combine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LOGGED_STATS", "STAT_COMBINE", "UPDATE_STATS", "LossStats", "combine_stats", "loss_stats"]


class LossStats(NamedTuple):
    """Detached 0-dim tensors (no device sync until `to_dict`), kept as sums, counts and extrema so
    that any split of a batch (micro-batches, ranks) combines into exactly the whole batch's
    statistics: each field combines as `STAT_COMBINE` says, and `to_dict` forms the logged means.

    `policy_loss` is the surrogate term of the returned loss (same aggregation and denominator,
    so it adds up over micro-batches like the loss). Ratio statistics are over masked tokens, or
    under importance_level="sequence" over completions with at least one token.
    """

    policy_loss: Tensor  # -AGG[min(rho A, clip(rho) A)] with the global denominator
    kl_sum: Tensor  # sum of the per-token KL estimate over masked tokens (0 when beta == 0)
    clip_low: Tensor  # tokens with rho < 1 - epsilon and A < 0 (clip active)
    clip_high: Tensor  # tokens with rho > 1 + epsilon_high and A > 0 (clip active; cispo: any A)
    clip_cap: Tensor  # tokens with rho > C (clip_ratio_c or delta) and A < 0 (cut to C * A)
    ratio_sum: Tensor  # sum of rho over the ratio's units
    ratio_units: Tensor  # tokens (token level) or completions (sequence level) with a ratio
    ratio_min: Tensor  # +inf when there is none
    ratio_max: Tensor  # -inf when there is none
    tokens: Tensor  # number of masked tokens
    entropy_sum: Tensor  # sum of the per-token entropy over masked tokens (0 when not given)
    cov_tokens: Tensor  # tokens chosen by the covariance (clip_cov: cut out; kl_cov: penalised)
    is_masked: Tensor  # tokens whose engine weight (algo.engine_is mode=mask) is 0: no loss from them

    def to_dict(self) -> dict[str, float]:
        """The logged statistics (``LOGGED_STATS``); this is where the values move to the host."""
        v = {name: float(value) for name, value in zip(self._fields, self)}
        return {name: derive(v) for name, (_, derive) in LOGGED_STATS.items()}


# How each field of LossStats combines over parts of a batch (micro-batches, then ranks).
STAT_COMBINE: dict[str, str] = {
    "policy_loss": "sum",  # each part already carries the global denominator
    "kl_sum": "sum",
    "clip_low": "sum",
    "clip_high": "sum",
    "clip_cap": "sum",
    "ratio_sum": "sum",
    "ratio_units": "sum",
    "ratio_min": "min",
    "ratio_max": "max",
    "tokens": "sum",
    "entropy_sum": "sum",
    "cov_tokens": "sum",
    "is_masked": "sum",
}


def _per(num: str, den: str) -> Callable[[dict[str, float]], float]:
    return lambda v: v[num] / v[den] if v[den] else 0.0


def _extremum(name: str) -> Callable[[dict[str, float]], float]:
    return lambda v: v[name] if v["ratio_units"] else 0.0  # 0, not inf, when nothing had a ratio


# The logged statistics: name -> (how it combines over micro-batches and ranks, its value from the
# combined fields). Every one is exact for any split: sums add, means are formed after summing.
LOGGED_STATS: dict[str, tuple[str, Callable[[dict[str, float]], float]]] = {
    "loss/policy": ("sum", lambda v: v["policy_loss"]),
    "kl": ("token-weighted mean", _per("kl_sum", "tokens")),
    "clip/low_frac": ("token-weighted mean", _per("clip_low", "tokens")),
    "clip/high_frac": ("token-weighted mean", _per("clip_high", "tokens")),
    "clip/cap_frac": ("token-weighted mean", _per("clip_cap", "tokens")),
    "ratio/mean": ("mean over the ratio's units", _per("ratio_sum", "ratio_units")),
    "ratio/min": ("min", _extremum("ratio_min")),
    "ratio/max": ("max", _extremum("ratio_max")),
    "tokens": ("sum", lambda v: v["tokens"]),
    "entropy": ("token-weighted mean", _per("entropy_sum", "tokens")),
    "clip/cov_frac": ("token-weighted mean", _per("cov_tokens", "tokens")),
    "engine_is/masked_frac": ("token-weighted mean", _per("is_masked", "tokens")),
}


def combine_stats(parts: list[LossStats]) -> LossStats:
    """The statistics of the union of ``parts`` (micro-batches of one batch), per `STAT_COMBINE`."""
    ops = {"sum": lambda t: t.sum(), "min": lambda t: t.amin(), "max": lambda t: t.amax()}
    stacked = [torch.stack([p[i].double() for p in parts]) for i in range(len(LossStats._fields))]
    return LossStats(*(ops[STAT_COMBINE[f]](t) for f, t in zip(LossStats._fields, stacked)))


# The update's other statistics (``commands.update``): "loss" is a sum (each part has the global
# denominator); grad_norm is taken once after the ranks' gradients are reduced; rollout/logprob_diff
# is token-weighted (sums over ranks, then divided); engine_is/rejected_frac is completion-weighted
# (the rejected and all completions summed over ranks, then divided; taken once per step); skipped is 1
# if any iteration was skipped; lr is the schedule's, the same on every rank.
UPDATE_STATS: dict[str, str] = {
    "loss": "sum",
    "grad_norm": "global",
    "rollout/logprob_diff": "token-weighted mean",
    "engine_is/rejected_frac": "completion-weighted mean",
    "skipped": "max",
    "lr": "global",
}


@torch.no_grad()
def loss_stats(
    policy: Tensor,
    kl: Tensor,
    clip_low: Tensor,
    clip_high: Tensor,
    clip_cap: Tensor,
    ratio: Tensor,
    ratio_mask: Tensor,
    weights: Tensor,
    entropy: Tensor,
    selected: Tensor,
    masked: Tensor,
) -> LossStats:
    """The statistics of one batch from the loss's per-token terms ([B, T] each; ``ratio`` and
    ``ratio_mask`` over the ratio's units; ``entropy`` 0 where not computed; ``selected`` and ``masked``
    bool: the covariance-selected tokens and those the engine weights mask).

    Eleven arguments: one per-token term of the loss each, named as ``STAT_COMBINE`` names the
    statistics they make.
    """
    # +-inf outside the mask: the neutral elements of min and max (no host sync, no NaN).
    ratio_min = (
        torch.where(ratio_mask, ratio, torch.inf).amin() if ratio.numel() else ratio.new_tensor(torch.inf)
    )
    ratio_max = (
        torch.where(ratio_mask, ratio, -torch.inf).amax() if ratio.numel() else ratio.new_tensor(-torch.inf)
    )
    return LossStats(
        policy_loss=policy.detach(),
        kl_sum=(kl * weights).sum().detach(),
        clip_low=clip_low.sum().to(weights.dtype),
        clip_high=clip_high.sum().to(weights.dtype),
        clip_cap=clip_cap.sum().to(weights.dtype),
        ratio_sum=torch.where(ratio_mask, ratio, 0.0).sum().detach(),
        ratio_units=ratio_mask.sum().to(weights.dtype),
        ratio_min=ratio_min.detach(),
        ratio_max=ratio_max.detach(),
        tokens=weights.sum(),
        entropy_sum=(entropy * weights).sum().detach(),
        cov_tokens=selected.sum().to(weights.dtype),
        is_masked=masked.sum().to(weights.dtype),
    )
