"""The learning-rate schedule: linear warm-up, then constant or a decay to a floor (``train.lr_schedule``).

    grpo train train.lr_schedule=cosine train.min_lr_ratio=0.1 train.warmup_steps=10

A step here is one rollout batch (``train.steps``): the schedule steps once per batch whatever the
optimizer steps inside it (``algo.num_iterations`` x ``algo.steps_per_generation``), as verl's does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def _constant(progress: float, floor: float) -> float:
    return 1.0


def _linear(progress: float, floor: float) -> float:
    return floor + (1.0 - floor) * (1.0 - progress)


def _cosine(progress: float, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# train.lr_schedule: the factor of train.lr after warm-up, from the decay's progress in [0, 1] and the
# floor (train.min_lr_ratio).
LR_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
}


def schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    kind: str = "constant",
    total_steps: int = 0,
    min_ratio: float = 0.0,
) -> Any:
    """Linear warm-up over ``warmup_steps`` steps, then ``kind`` (``LR_SCHEDULES``): constant, or a
    decay from lr at the end of warm-up to lr * ``min_ratio`` at step ``total_steps``.

    Scheduler step s (0-based; step s + 1 trains with it) has factor (s + 1) / (warmup + 1) while
    s < warmup, then decay((s - warmup) / (total - warmup)): the floor is reached just after the last
    step, so no step trains at lr 0 (transformers' and verl's convention). The factor is a plain
    function of s, so the checkpointed scheduler state (its step count) restores the whole sequence.
    """
    warm, decay = max(warmup_steps, 0), LR_SCHEDULES[kind]
    span = max(total_steps - warm, 1)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        return decay(min((s - warm) / span, 1.0), min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
