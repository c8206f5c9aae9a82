"""What one training step trains on: the prompt order, rollout rounds, DAPO's dynamic sampling and
overlong reward shaping, and the per-prompt seed streams.

    grpo train algo=dapo                                  # dynamic sampling on
    grpo train algo.overlong_buffer=64 algo.overlong_penalty=1.0
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from grpo_cli.config import AlgoConfig
from grpo_cli.rollout.generate import Sampler, score
from grpo_cli.rollout.record import Rollout, concat_rollouts
from grpo_cli.runtime import distributed
from grpo_cli.runtime.rng import derive_seed


class PromptOrder:
    """Shuffled passes over the training rows; its state (epoch, position) is part of a checkpoint."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch, self.pos = num_rows, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        return random.Random(self.seed * 100_003 + self.epoch).sample(range(self.num_rows), self.num_rows)

    @property
    def drawn(self) -> int:
        """Prompts drawn so far over all epochs: the draw number of the next one."""
        return self.epoch * self.num_rows + self.pos

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.num_rows:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def overlong_penalty(lengths: torch.Tensor, budget: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), [N] lengths -> [N] penalties <= 0.

    ``lengths``: each episode's tokens after its prompt (model and tool tokens: what the budget counts);
    ``budget``: ``envs.episode.episode_budget`` (``rollout.max_new_tokens`` for a single turn).
    0 up to ``budget - buffer`` tokens, then linear down to ``-penalty`` at ``budget`` (a completion cut
    off without EOS has exactly that length, so it gets the full penalty).
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    excess = (lengths.float().cpu() - (budget - buffer)).clamp(min=0)
    return -penalty * excess / buffer


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards (NaN: unjudged) -> [N / G] bool: the judged rewards of the group are not all equal.

    A group with equal rewards has zero advantages, hence no policy gradient (DAPO section 3.2).
    """
    grouped = rewards.view(-1, group_size)
    judged = ~torch.isnan(grouped)
    hi = torch.where(judged, grouped, -math.inf).amax(1)
    lo = torch.where(judged, grouped, math.inf).amin(1)
    return (hi - lo) > 1e-8  # a group with no judged reward: -inf - inf, not informative


@dataclass
class StepBatch:
    """One step's rollouts: ``trained`` (prompts_per_step groups) is trained on; ``seen`` is every group sampled."""

    trained: Rollout
    seen: Rollout
    rounds: int


def rollout_metrics(ro: Rollout) -> dict[str, float]:
    """Metrics of everything sampled in a step (every rank's, gathered): reward, accuracy,
    zero-variance groups, length, the reward rules' (``concat_rollouts`` combines them exactly) and
    the episodes' means per completion."""
    r, judged = ro.rewards, ro.judged
    return {
        "reward": float(torch.nanmean(r)),
        "reward_std": float(r[judged].std()) if judged.sum() > 1 else 0.0,
        "accuracy": ro.accuracy,
        "zero_std_frac": 1.0 - float(informative_groups(r, ro.group_size).float().mean()),
        "completion_len": float(ro.lengths.float().mean()),
        **ro.reward_metrics,
        **{f"episode/{k}": sum(v) / len(v) for k, v in ro.episode_stats.items() if v},
    }


def batch_metrics(
    batch: StepBatch, pad_id: int, dynamic_sampling: bool
) -> tuple[dict[str, float], Rollout, float]:
    """The step's rollout metrics over every rank's sampled groups (``rollout_metrics``), every rank's
    trained rollout (for the logs) and the completion tokens sampled (the step's throughput). With
    dynamic sampling also ``sampling_rounds`` and the trained groups' ``batch_zero_std_frac``."""
    seen = gather_rollout(batch.seen, pad_id)
    metrics, tokens = rollout_metrics(seen), float(seen.lengths.sum())
    if not dynamic_sampling:
        return metrics, seen, tokens
    everyone = gather_rollout(batch.trained, pad_id)
    metrics["sampling_rounds"] = float(batch.rounds)
    metrics["batch_zero_std_frac"] = rollout_metrics(everyone)["zero_std_frac"]
    return metrics, everyone, tokens


def gather_rollout(ro: Rollout, pad_id: int) -> Rollout:
    """Every rank's rollout, concatenated in rank order (the 1-process layout); ``ro`` itself with one rank."""
    if not distributed.world().enabled:
        return ro
    return concat_rollouts(distributed.gather_objects(ro.to("cpu")), pad_id)


# Seed streams: the training prompts and the held-out problems never share a sampling stream.
TRAIN_STREAM, HELD_OUT_STREAM = 0, 1


def draw_seed(seed: int, draw: int, stream: int = TRAIN_STREAM) -> int:
    """The seed of the sampling stream of the ``draw``-th prompt of ``stream`` in a run seeded ``seed``.

    A function of the run's seed and the prompt's place in its stream only: the completions of a
    prompt do not depend on the batch, the rank or the world size it is sampled in, and a resumed
    run draws what the uninterrupted one drew.
    """
    return derive_seed(seed, stream, draw)


@dataclass
class BatchSource:
    """Where a training step's batch comes from: the sampler, the reward rules, the training rows and
    their order, and the settings that shape a batch (``algo``: G, dynamic sampling, overlong shaping;
    the run's ``seed``; ``train.prompts_per_step``)."""

    sampler: Sampler
    rewarder: Any
    rows: list[dict]
    order: PromptOrder
    algo: AlgoConfig
    seed: int
    prompts_per_step: int


def _roll_out_round(src: BatchSource) -> Rollout:
    """Score G completions of the round's prompts; every rank draws the whole round (so all orders stay
    in step) and keeps its own share."""
    first = src.order.drawn
    index = list(enumerate(src.order.take(src.prompts_per_step), start=first))
    mine = distributed.shard(index)
    rows = [src.rows[i] for _, i in mine]
    seeds = [draw_seed(src.seed, d) for d, _ in mine]
    ro = score(src.sampler.generate(rows, src.algo.group_size, seeds=seeds), src.rewarder)
    algo = src.algo
    if algo.overlong_buffer > 0:
        episode_tokens = ro.completion_mask.sum(-1)  # model and tool tokens: what the budget counts
        budget = src.sampler.spec.budget
        pen = overlong_penalty(episode_tokens, budget, algo.overlong_buffer, algo.overlong_penalty)
        ro.rewards = ro.rewards + pen  # NaN (unjudged) stays NaN
        ro.reward_metrics["reward/overlong_penalty"] = float(pen.mean())
    return ro


def roll_out_batch(src: BatchSource) -> StepBatch:
    """Roll out, score and (with ``algo.dynamic_sampling``) filter one step's groups.

    P is this rank's share of the step's groups, ``prompts_per_step / world_size``. Dynamic sampling
    (DAPO): roll out rounds of P prompts until P informative groups are in hand or
    ``algo.max_sampling_rounds`` rounds are spent, and train on the first P of them. When the cap is
    hit first, the batch is filled up with zero-variance groups in the order sampled: they add no
    policy gradient (zero advantage), only the KL term, and keep the batch size, and with it the loss
    normalisation, constant.
    """
    algo, G = src.algo, src.algo.group_size
    P = src.prompts_per_step // distributed.world().size  # this rank's groups
    max_rounds = algo.max_sampling_rounds if algo.dynamic_sampling else 1
    parts: list[Rollout] = []
    found = 0
    # With several ranks, every rank rolls out until each has its own P informative groups (or the
    # rounds run out), so all take the same number of rounds.
    while len(parts) < max_rounds and (not parts or not distributed.all_ranks(found >= P)):
        parts.append(_roll_out_round(src))
        found += int(informative_groups(parts[-1].rewards, G).sum())
    seen = concat_rollouts(parts, src.sampler.policy.tokenizer.pad_token_id)
    if not algo.dynamic_sampling:
        return StepBatch(seen, seen, 1)
    chosen = choose_groups(informative_groups(seen.rewards, G).tolist(), P)
    return StepBatch(seen.select([g * G + j for g in chosen for j in range(G)]), seen, len(parts))


def choose_groups(informative: list[bool], count: int) -> list[int]:
    """The first ``count`` informative groups, topped up with zero-variance ones; in sampled order."""
    chosen = [g for g, ok in enumerate(informative) if ok][:count]
    chosen += [g for g, ok in enumerate(informative) if not ok][: count - len(chosen)]
    return sorted(chosen)
