r"""Advantages: one number per completion from the rewards of its group, as pure tensor functions.

Two estimators (``algo.advantage``), each a row of ``ADVANTAGES``, then one of the scales of
``REWARD_SCALES`` (``algo.scale_rewards``):

    group (GRPO, DeepSeekMath arXiv 2402.03300):   A_i = (r_i - mean_j r_j) / scale
    rloo  (RLOO, Ahmadian et al. arXiv 2402.14740; Kool et al. 2019):
                                                    A_i = (r_i - mean_{j != i} r_j) / scale
                                                        = G / (G - 1) * (r_i - mean_j r_j) / scale

The leave-one-out baseline does not contain r_i itself, so it is an unbiased baseline; in value it is
the group-mean advantage stretched by G / (G - 1) (TRL's RLOOTrainer and verl's ``adv_estimator=rloo``).
The scale is the same for both: the group's unbiased std (GRPO), the batch's (mean still per group),
or 1 (Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["ADVANTAGES", "REWARD_SCALES", "advantages", "group_advantages", "rloo_advantages"]


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


# algo.advantage -> the estimator.
ADVANTAGES: dict[str, Callable[..., Tensor]] = {"group": group_advantages, "rloo": rloo_advantages}


def advantages(rewards: Tensor, group_size: int, estimator: str = "group", scale: str = "group") -> Tensor:
    """`ADVANTAGES[estimator]`: [N] rewards -> [N] advantages (see the module docstring)."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage={estimator!r}: expected one of {sorted(ADVANTAGES)}")
    return ADVANTAGES[estimator](rewards, group_size, scale=scale)
