"""The held-out evaluation ``grpo train`` (every ``train.eval_every`` steps) and ``grpo eval`` share.

Problem i of the held-out rows samples from its own stream, ``draw_seed(seed, i, HELD_OUT_STREAM)``,
so what it gets depends on the run's seed and its index alone: not on the batch it is decoded in, the
rank that decodes it, or the global RNG (the training streams go on as without evaluation). Hence
``grpo eval`` on a run's ``checkpoint-N``, given the run's held-out settings (``eval.problems`` =
``train.eval_problems``, ``eval.samples`` = ``train.eval_samples``), reports as ``pass@1`` exactly the
run's ``eval/accuracy`` at step N.

Correctness has one definition, ``rewards.correct`` (the first reward rule scores 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grpo_cli.config import TrainConfig
from grpo_cli.engines import Decoding
from grpo_cli.rewards import correct
from grpo_cli.rollout.batch import HELD_OUT_STREAM, draw_seed
from grpo_cli.rollout.generate import Sampler, score
from grpo_cli.rollout.record import Rollout
from grpo_cli.run.progress import GenerationProgress
from grpo_cli.runtime import distributed


def held_out_seeds(seed: int, index: Sequence[int]) -> list[int]:
    """The sampling seeds of held-out problems ``index`` in a run seeded ``seed`` (their own stream)."""
    return [draw_seed(seed, i, HELD_OUT_STREAM) for i in index]


def held_out_rollout(
    sampler: Sampler,
    rows: Sequence[dict],
    n: int,
    decoding: Decoding,
    seeds: Sequence[int],
    progress: tuple[GenerationProgress, str],
) -> Rollout:
    """n completions (or episodes) of each row, unscored; row i draws from ``seeds[i]``
    (``held_out_seeds``) when sampled, from nothing when greedy.

    ``progress``: where the generation shows (a ``GenerationProgress``) and its bar's label.
    """
    seeds = None if decoding.greedy else seeds
    shown, label = progress
    with shown.task(label, len(rows) * n) as advance:
        return sampler.generate(rows, n, decoding, seeds, advance)


def held_out_metrics(
    sampler: Sampler,
    rewarder: Any,
    rows: list[dict],
    tr: TrainConfig,
    seed: int,
    progress: GenerationProgress | None = None,
) -> dict[str, float]:
    """``grpo train``'s held-out numbers: ``eval/accuracy`` (``train.eval_samples`` sampled completions
    per problem), ``eval/reward`` and ``eval/accuracy_greedy``.

    With W ranks each evaluates an equal share (the last ones padded with repeats that are not
    counted; under FSDP every rank must run the same passes) and the counts are summed.
    """
    if not rows:
        return {}
    n = tr.eval_samples
    world = distributed.world()
    per_rank = -(-len(rows) // world.size)
    mine = list(range(world.rank * per_rank, min((world.rank + 1) * per_rank, len(rows))))
    counted = len(mine)
    mine += [mine[-1] if mine else 0] * (per_rank - counted)
    picked = [rows[i] for i in mine]
    shown = progress or GenerationProgress()
    sampling, greedy = Decoding.of(sampler.rollout), Decoding.of(sampler.rollout, greedy=True)
    seeds = held_out_seeds(seed, mine)
    sampled = held_out_rollout(sampler, picked, n, sampling, seeds, (shown, "held-out: sampling"))
    greedy = held_out_rollout(sampler, picked, 1, greedy, seeds, (shown, "held-out: greedy"))
    sums = _counts(score(sampled, rewarder), counted * n) + _counts(score(greedy, rewarder), counted)
    total = distributed.all_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
    return {
        "eval/accuracy": total[0] / total[1],
        "eval/reward": total[2] / total[3] if total[3] else float("nan"),
        "eval/accuracy_greedy": total[4] / total[5],
    }


def held_out_due(step: int, tr: TrainConfig) -> bool:
    """Whether ``grpo train`` runs the held-out evaluation after ``step`` (0: before the first step).

    ``train.eval_every=0`` means none at all unless ``train.eval_at_ends`` asks for the first and last;
    ``train.eval_problems=0`` means none.
    """
    if tr.eval_problems == 0:
        return False
    if step in (0, tr.steps):
        return tr.eval_every > 0 or tr.eval_at_ends
    return tr.eval_every > 0 and step % tr.eval_every == 0


def _counts(ro: Rollout, k: int) -> list[float]:
    """Over the first k completions: [correct, k, sum of judged rewards, judged]."""
    right = sum(correct(ro.per_rule)[:k])
    rewards = ro.rewards[:k]
    judged = ro.judged[:k]
    return [float(right), float(k), float(rewards[judged].sum()), float(judged.sum())]
