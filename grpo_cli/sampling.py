"""What one training step trains on: the prompt order, rollout rounds, DAPO's dynamic sampling and
overlong reward shaping.

    grpo train algo=dapo                                  # dynamic sampling on
    grpo train algo.overlong_buffer=64 algo.overlong_penalty=1.0
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from grpo_cli import distributed
from grpo_cli.data import build_prompt
from grpo_cli.models import Policy
from grpo_cli.rollout import Rollout, generate, pad_cat, score


class PromptSampler:
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


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), [N] lengths -> [N] penalties <= 0.

    0 up to ``max_new_tokens - buffer`` tokens, then linear down to ``-penalty`` at ``max_new_tokens``
    (a completion cut off without EOS has exactly that length, so it gets the full penalty).
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    excess = (lengths.float().cpu() - (max_new_tokens - buffer)).clamp(min=0)
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
class Sampled:
    """One step's sampling: ``trained`` (prompts_per_step groups) is trained on; ``seen`` is every group sampled."""

    trained: Rollout
    seen: Rollout
    rounds: int


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Metrics of everything sampled in a step: reward, accuracy, zero-variance groups, length."""
    r = rollout.rewards
    return {
        "reward": float(torch.nanmean(r)),
        "reward_std": float(r[~torch.isnan(r)].std()) if (~torch.isnan(r)).sum() > 1 else 0.0,
        "accuracy": rollout.accuracy,
        "zero_std_frac": 1.0 - float(informative_groups(r, rollout.group_size).float().mean()),
        "completion_len": float(rollout.lengths.float().mean()),
        **rollout.reward_metrics,
    }


# Seed streams: the training prompts and the held-out problems never share a sampling stream.
TRAIN_STREAM, HELD_OUT_STREAM = 0, 1


def draw_seed(seed: int, draw: int, stream: int = TRAIN_STREAM) -> int:
    """The seed of the sampling stream of the ``draw``-th prompt of ``stream`` in a run seeded ``seed``.

    A function of the run's seed and the prompt's place in its stream only: the completions of a
    prompt do not depend on the batch, the rank or the world size it is sampled in, and a resumed
    run draws what the uninterrupted one drew.
    """
    return int(np.random.SeedSequence([seed, stream, draw]).generate_state(1, np.uint64)[0] >> 1)


def _sample_round(
    policy: Policy, sampler: PromptSampler, rows: list[dict], rewarder: Any, cfg: Any
) -> Rollout:
    # Every rank draws the whole round (so all samplers stay in step) and keeps its own share.
    first = sampler.drawn
    index = list(enumerate(sampler.take(cfg.train.prompts_per_step), start=first))
    mine = distributed.shard(index)
    picked = [rows[i] for _, i in mine]
    prompts = [build_prompt(r, cfg.data.template) for r in picked]
    seeds = [draw_seed(cfg.seed, d) for d, _ in mine]
    ro = score(
        generate(
            policy,
            picked,
            prompts,
            cfg.algo.group_size,
            cfg.rollout,
            cfg.model.chat_template,
            seeds=seeds,
            system_prompt=cfg.model.system_prompt,
        ),
        rewarder,
    )
    if cfg.algo.overlong_buffer > 0:
        pen = overlong_penalty(
            ro.lengths, cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer, cfg.algo.overlong_penalty
        )
        ro.rewards = ro.rewards + pen  # NaN (unjudged) stays NaN
        ro.reward_metrics["reward/overlong_penalty"] = float(pen.mean())
    return ro


def sample_step(policy: Policy, sampler: PromptSampler, rows: list[dict], rewarder: Any, cfg: Any) -> Sampled:
    """Sample, score and (with ``algo.dynamic_sampling``) filter one step's groups.

    P is this rank's share of the step's groups, ``prompts_per_step / world_size``. Dynamic sampling
    (DAPO): sample rounds of P prompts until P informative groups are in hand or
    ``algo.max_sampling_rounds`` rounds are spent, and train on the first P of them. When the cap is hit first, the batch is filled up with
    zero-variance groups in the order sampled: they add no policy gradient (zero advantage), only
    the KL term, and keep the batch size, and with it the loss normalisation, constant.
    """
    algo, G = cfg.algo, cfg.algo.group_size
    P = cfg.train.prompts_per_step // distributed.world().size  # this rank's groups
    max_rounds = algo.max_sampling_rounds if algo.dynamic_sampling else 1
    parts: list[Rollout] = []
    found = 0
    # With several ranks, every rank samples until each has its own P informative groups (or the
    # rounds run out), so all take the same number of rounds.
    while len(parts) < max_rounds and (not parts or not distributed.all_ranks(found >= P)):
        parts.append(_sample_round(policy, sampler, rows, rewarder, cfg))
        found += int(informative_groups(parts[-1].rewards, G).sum())
    seen = concat_rollouts(parts, policy.tokenizer.pad_token_id)
    if not algo.dynamic_sampling:
        return Sampled(seen, seen, 1)
    chosen = choose_groups(informative_groups(seen.rewards, G).tolist(), P)
    return Sampled(seen.select([g * G + j for g in chosen for j in range(G)]), seen, len(parts))


def choose_groups(informative: list[bool], count: int) -> list[int]:
    """The first ``count`` informative groups, topped up with zero-variance ones; in sampled order."""
    chosen = [g for g, ok in enumerate(informative) if ok][:count]
    chosen += [g for g, ok in enumerate(informative) if not ok][: count - len(chosen)]
    return sorted(chosen)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Several scored rollouts as one: prompts re-padded on the left, completions on the right.

    Reward counters (``reward_counts``) are summed over the parts, the other reward metrics averaged
    (every part holds the same number of completions).
    """
    if len(parts) == 1:
        return parts[0]

    counts = set().union(*(p.reward_counts for p in parts))
    metrics: dict[str, float] = {}
    for key in {k for p in parts for k in p.reward_metrics}:
        values = [p.reward_metrics[key] for p in parts if key in p.reward_metrics]
        metrics[key] = sum(values) if key in counts else sum(values) / len(values)
    return Rollout(
        prompt_ids=pad_cat([p.prompt_ids for p in parts], pad_id, left=True),
        prompt_mask=pad_cat([p.prompt_mask for p in parts], 0, left=True),
        completion_ids=pad_cat([p.completion_ids for p in parts], pad_id),
        completion_mask=pad_cat([p.completion_mask for p in parts], 0),
        texts=[t for p in parts for t in p.texts],
        rows=[r for p in parts for r in p.rows],
        group_size=parts[0].group_size,
        rewards=torch.cat([p.rewards for p in parts]),
        per_rule={k: [s for p in parts for s in p.per_rule[k]] for k in parts[0].per_rule},
        reward_metrics=metrics,
        reward_counts=counts,
        engine_logps=None
        if any(p.engine_logps is None for p in parts)
        else pad_cat([p.engine_logps for p in parts], 0),
    )
