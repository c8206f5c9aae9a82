r"""Advantages: one number per completion from the rewards of its group, as pure tensor functions.

The estimators (``algo.advantage``), each a row of ``ADVANTAGES``; all but the REINFORCE++ pair then
divide by one of the scales of ``REWARD_SCALES`` (``algo.scale_rewards``). r_i is the reward of
completion i of a group of G, L_i its token count (model tokens, in the loss):

    group  (GRPO, DeepSeekMath arXiv 2402.03300):   A_i = (r_i - mean_j r_j) / scale
    rloo   (RLOO, Ahmadian et al. arXiv 2402.14740; Kool et al. 2019):
                                                     A_i = (r_i - mean_{j != i} r_j) / scale
                                                         = G / (G - 1) * (r_i - mean_j r_j) / scale
    opo    (OPO, arXiv 2505.23585: the length-weighted optimal baseline of an on-policy step):
                                                     A_i = (r_i - sum_j L_j r_j / sum_j L_j) / scale
    passk  (pass@k, k = ``algo.passk_k`` in [2, G]; PKPO arXiv 2505.15201, Tang et al. arXiv 2503.19595):
                                                     A_i = E_S[ max(0, r_i - max_{j in S} r_j) ] / scale
           over the (k - 1)-subsets S of the other G - 1 completions: what o_i adds to the best of a
           k-sample that holds it (the leave-one-out gradient of E[max of k], times G / k). k = G is
           verl's grpo_passk: only the group's best gets r_max - r_second.
    reinforce_pp           (REINFORCE++, arXiv 2501.03262): A_i = (r_i - m) / (s + eps)
    reinforce_pp_baseline  (its group-baseline variant):     A_i = (c_i - m_c) / (s_c + eps), c_i = r_i - mean_j r_j
           m, s: the mean and unbiased std over the batch's tokens (completion i weighs L_i), as verl and
           OpenRLHF whiten; the scale is this whitening, not ``algo.scale_rewards``. With outcome rewards
           and gamma = 1 every token of o_i has the return r_i, so one number per completion is exact.

The leave-one-out baseline does not contain r_i itself, so it is an unbiased baseline; in value it is
the group-mean advantage stretched by G / (G - 1) (TRL's RLOOTrainer and verl's ``adv_estimator=rloo``).
The scale is the group's unbiased std (GRPO), the batch's (mean still per group), or 1 (Dr. GRPO,
arXiv 2503.20783). What it leaves out: REINFORCE++'s KL in the reward (the KL stays in the loss,
``algo.beta``) and discounting (gamma = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGES",
    "BATCH_ESTIMATORS",
    "REWARD_SCALES",
    "advantages",
    "group_advantages",
    "opo_advantages",
    "passk_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
]


def _unbiased_std(x: Tensor, dim: int | None = None) -> Tensor:
    # A single reward has no spread: 0 rather than torch.std's NaN for one sample.
    n = x.numel() if dim is None else x.shape[dim]
    return x.std(dim=dim, keepdim=dim is not None) if n > 1 else x.new_zeros(())


REWARD_SCALES: dict[str, Callable[[Tensor, float], Tensor | float]] = {
    "group": lambda grouped, eps: _unbiased_std(grouped, dim=1) + eps,
    "batch": lambda grouped, eps: _unbiased_std(grouped) + eps,
    "none": lambda grouped, eps: 1.0,
}


def _grouped(rewards: Tensor, group_size: int, scale: str) -> Tensor:
    """rewards [N] -> [N / G, G] (floating), after checking the arguments."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {sorted(REWARD_SCALES)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.reshape(-1, group_size)


def _lengths(lengths: Tensor | None, rewards: Tensor, name: str) -> Tensor:
    if lengths is None or lengths.shape != rewards.shape:
        raise ValueError(
            f"{name} weighs completions by their token counts: pass lengths [N] with the rewards"
        )
    return lengths.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """A_i = (r_i - mean of its group) / (std + eps), std unbiased.

    Args:
        rewards: [N] with N = num_groups * G, the G completions of a prompt contiguous.
        group_size: G.
        scale: "group" divides by the group's std (GRPO), "batch" by the std of all N rewards
            (mean still per group), "none" only centres (Dr. GRPO).
        eps: keeps a group whose rewards are all equal at 0 instead of 0/0.

    Returns:
        [N] advantages, floating dtype of `rewards` (float32 for integer rewards).
    """
    grouped = _grouped(rewards, group_size, scale)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / REWARD_SCALES[scale](grouped, eps)).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """A_i = (r_i - mean of the other G - 1 rewards of its group) / scale (RLOO's leave-one-out baseline).

    Args and Returns as `group_advantages`; G must be >= 2 (one completion has no others).
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (got {group_size}): one completion has no others")
    grouped = _grouped(rewards, group_size, scale)  # [num_groups, G]
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [num_groups, G]
    return ((grouped - others) / REWARD_SCALES[scale](grouped, eps)).reshape(-1)


def opo_advantages(
    rewards: Tensor, group_size: int, lengths: Tensor, scale: str = "group", eps: float = 1e-4
) -> Tensor:
    """A_i = (r_i - sum_j L_j r_j / sum_j L_j over its group) / scale (OPO's optimal baseline).

    ``lengths`` [N]: L_i, the completions' token counts (a group without tokens gets baseline 0).
    Other Args and Returns as `group_advantages`; the paper's form is scale="none".
    """
    grouped = _grouped(rewards, group_size, scale)
    weights = _lengths(lengths, rewards, "opo").reshape(grouped.shape)
    baseline = (weights * grouped).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    return ((grouped - baseline) / REWARD_SCALES[scale](grouped, eps)).reshape(-1)


def passk_advantages(
    rewards: Tensor, group_size: int, k: int | None = None, scale: str = "group", eps: float = 1e-4
) -> Tensor:
    """A_i = mean over the (k - 1)-subsets S of the others of max(0, r_i - max_S r), / scale (pass@k).

    With the other G - 1 rewards sorted, o_(1) <= ... <= o_(G-1), max_S = o_(j) for a C(j - 1, k - 2)
    / C(G - 1, k - 1) share of the subsets; so A_i is that weighted sum of max(0, r_i - o_(j)).

    Args:
        k: 2 <= k <= G; None means G (verl's grpo_passk). Other Args and Returns as `group_advantages`.
    """
    k = group_size if k is None else int(k)
    if not 2 <= k <= group_size:
        raise ValueError(f"passk needs 2 <= k <= group_size={group_size} (got k={k})")
    grouped = _grouped(rewards, group_size, scale)  # [P, G]
    G = group_size
    others_idx = torch.tensor([[j for j in range(G) if j != i] for i in range(G)], device=grouped.device)
    others = grouped[:, others_idx].sort(dim=-1).values  # [P, G, G - 1], ascending
    share = [math.comb(j - 1, k - 2) / math.comb(G - 1, k - 1) for j in range(1, G)]
    share = torch.tensor(share, dtype=grouped.dtype, device=grouped.device)  # [G - 1], sums to 1
    gain = (grouped[..., None] - others).clamp(min=0)  # [P, G, G - 1]
    return ((gain * share).sum(-1) / REWARD_SCALES[scale](grouped, eps)).reshape(-1)


def reinforce_pp_advantages(
    rewards: Tensor, group_size: int, lengths: Tensor, baseline: bool = False, eps: float = 1e-4
) -> Tensor:
    """REINFORCE++: (x_i - m) / (s + eps) with x_i = r_i (or, with ``baseline``, r_i minus its group's
    mean), m and s the mean and unbiased std over the batch's tokens (completion i counted L_i times).

    Args:
        rewards: [N], the whole batch's (every rank's: the statistics are the batch's).
        lengths: [N] token counts L_i. Returns [N].
    """
    grouped = _grouped(rewards, group_size, "none")
    x = grouped - grouped.mean(1, keepdim=True) if baseline else grouped
    x, w = x.reshape(-1), _lengths(lengths, rewards, "reinforce_pp")
    n = w.sum()
    mean = (w * x).sum() / n.clamp(min=1)
    var = (w * (x - mean).square()).sum() / (n - 1).clamp(min=1)  # Bessel over tokens, as verl
    return (x - mean) / (var.sqrt() + eps)


# algo.advantage -> the estimator, as (rewards [N], G, scale, lengths [N] or None, k) -> [N].
ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "group": lambda r, g, scale, lengths, k: group_advantages(r, g, scale),
    "rloo": lambda r, g, scale, lengths, k: rloo_advantages(r, g, scale),
    "opo": lambda r, g, scale, lengths, k: opo_advantages(r, g, lengths, scale),
    "passk": lambda r, g, scale, lengths, k: passk_advantages(r, g, k, scale),
    "reinforce_pp": lambda r, g, scale, lengths, k: reinforce_pp_advantages(r, g, lengths),
    "reinforce_pp_baseline": lambda r, g, scale, lengths, k: reinforce_pp_advantages(r, g, lengths, True),
}
# The estimators whose statistics span the whole batch (every rank's rewards), not one group.
BATCH_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")


def advantages(
    rewards: Tensor,
    group_size: int,
    estimator: str = "group",
    scale: str = "group",
    lengths: Tensor | None = None,
    k: int | None = None,
) -> Tensor:
    """`ADVANTAGES[estimator]`: [N] rewards -> [N] advantages (see the module docstring); ``lengths``
    [N] token counts for opo and reinforce_pp*, ``k`` for passk."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage={estimator!r}: expected one of {sorted(ADVANTAGES)}")
    return ADVANTAGES[estimator](rewards, group_size, scale, lengths, k)
