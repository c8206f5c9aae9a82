r"""The tokens Clip-Cov and KL-Cov act on: those whose log-prob moves most with the advantage.

"The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et al., arXiv
2505.22617) shows that the policy's entropy falls in proportion to the covariance, over the batch's
tokens, between a token's log-prob and its advantage; a few tokens of high covariance drive the
collapse. Per token (i, t) of the step,

    Cov_{i,t} = (log pi(o_{i,t}) - mean log pi) * (A_i - mean A)        means over the step's tokens

and two ways to restrain those tokens (``algo.objective``, ``core.objectives``):

    clip_cov: among the tokens with clip_cov_lb < Cov < clip_cov_ub, max(1, floor(clip_cov_ratio * n))
              chosen uniformly at random get no policy gradient (verl's clip_cov_ratio 2e-4, lb 1, ub 5)
    kl_cov:   the max(1, floor(kl_cov_ratio * n)) tokens of largest Cov get the penalty
              ppo_kl_coef * |log pi_theta / pi_old| (verl's kl_cov_ratio 2e-4, ppo_kl_coef 0.1)

with n the step's token count. Here the tokens are chosen once per step, from pi_old (the weights that
sampled, where no ratio has moved yet: verl computes them in its first, on-policy pass), over every
rank's tokens in one order, so any split into micro-batches, mini-batches or ranks selects the same
tokens. Functions of flat [n] tensors; ``commands.selections`` gathers them over ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clip_cov_tokens", "kl_cov_tokens", "selection_count", "token_covariance"]


def token_covariance(logps: Tensor, advantages: Tensor) -> Tensor:
    """Cov_k = (logp_k - mean logp) (A_k - mean A) over the flat [n] token values (float64)."""
    lp, adv = logps.double(), advantages.double()
    if lp.numel() == 0:
        return lp
    return (lp - lp.mean()) * (adv - adv.mean())


def selection_count(ratio: float, n: int) -> int:
    """max(1, floor(ratio * n)) tokens of n (0 when there are none), as verl counts them."""
    return max(1, int(ratio * n)) if n else 0


def kl_cov_tokens(cov: Tensor, count: int, tie: float = 0.0) -> Tensor:
    """[n] bool: the `count` largest of `cov` [n], and any within ``tie`` (relative) of the smallest of
    them, so that equal values computed in different batch shapes are in or out together."""
    out = torch.zeros_like(cov, dtype=torch.bool)
    if count <= 0 or cov.numel() == 0:
        return out
    threshold = cov.topk(min(count, cov.numel())).values[-1]
    return cov >= threshold - tie * max(1.0, abs(float(threshold)))


def clip_cov_tokens(cov: Tensor, count: int, low: float, high: float, seed: int) -> Tensor:
    """[n] bool: `count` tokens drawn uniformly without replacement, with a generator seeded by
    `seed`, from those with low < cov < high (all of them when fewer)."""
    candidates = ((cov > low) & (cov < high)).nonzero().flatten()
    out = torch.zeros_like(cov, dtype=torch.bool)
    if count <= 0 or candidates.numel() == 0:
        return out
    gen = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:count]]
    out[chosen] = True
    return out
