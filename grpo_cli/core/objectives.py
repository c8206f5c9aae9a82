r"""The surrogate objectives S_{i,t} of ``core.loss`` (``algo.objective``), one function each.

    clip:  min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)                     PPO / GRPO
           where rho > C and A < 0: C A, with C = clip_ratio_c (dual-clip, Ye et al. 2020,
           arXiv 1912.09729, verl) or delta (two-sided GRPO, INTELLECT-2 arXiv 2505.07291, TRL)
    cispo: sg(clip(rho, 1 - epsilon, 1 + epsilon_high)) A log pi_theta          MiniMax-M1 (2506.13585)

Each maps the ratio [B, T] (broadcast from [B] at sequence level), the advantages [B, 1], the config,
the mask [B, T] and log pi_theta [B, T] (0 off the mask) to the surrogate [B, T] and three [B, T] bool
masks of the tokens whose weight was cut (below, above, at the negative-advantage cap), for the
statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["OBJECTIVES", "clip_range"]


def clip_range(cfg: Any) -> tuple[float, float]:
    """(1 - epsilon, 1 + epsilon_high), epsilon_high None meaning epsilon."""
    return 1.0 - cfg.epsilon, 1.0 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)


def _negative_cap(cfg: Any) -> float:
    # Dual-clip's c and the two-sided delta both bound rho for A < 0; with both, the smaller binds.
    bounds = [b for b in (getattr(cfg, "clip_ratio_c", None), getattr(cfg, "delta", None)) if b is not None]
    return min(bounds, default=math.inf)


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, cfg: Any, mask: Tensor, logps: Tensor
) -> tuple[Tensor, ...]:
    """min(rho A, clip(rho) A) per token, and C * A where rho > C with A < 0 (dual-clip / delta).

    Written as a choice rather than torch.min: torch.min splits the gradient at ties, and the
    choice makes plain that the clip bites only on the side the advantage points to.
    """
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


def _cispo_surrogate(ratio: Tensor, adv: Tensor, cfg: Any, mask: Tensor, logps: Tensor) -> tuple[Tensor, ...]:
    """sg(clip(rho, 1 - epsilon, 1 + epsilon_high)) * A * log pi_theta per token (CISPO).

    The weight is detached: d S / d log pi = clip(rho) A on every token, clipped or not; the clip only
    bounds how much weight one token gets. Its value is not PPO's (it is A log pi, not about A).
    """
    low, high = clip_range(cfg)
    weight = ratio.detach().clamp(min=low, max=high)
    clip_low = (ratio < low) & mask
    clip_high = (ratio > high) & mask
    return weight * adv * logps, clip_low, clip_high, torch.zeros_like(mask)


OBJECTIVES = {"clip": _clipped_surrogate, "cispo": _cispo_surrogate}
