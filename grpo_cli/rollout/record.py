"""The ``Rollout`` record: one batch of scored completions, and its batch operations."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_cli.rewards import correct


@dataclass
class Rollout:
    """One batch of N = num_prompts * G completions; group i is rows [i*G, (i+1)*G)."""

    prompt_ids: torch.Tensor  # [N, L] left-padded prompt tokens, repeated for each completion
    prompt_mask: torch.Tensor  # [N, L] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] sampled tokens, pad after EOS
    completion_mask: torch.Tensor  # [N, T] 1 on the episode's tokens (model and tool; EOS included)
    texts: list[
        str
    ]  # [N] the model's own words (its turns, decoded; special tokens dropped): what rules read
    rows: list[dict]  # [N] the dataset row behind each completion
    group_size: int
    rewards: torch.Tensor | None = None  # [N] float32; NaN where no rule could judge the completion
    per_rule: dict[str, list[float | None]] = field(default_factory=dict)
    reward_metrics: dict[str, float] = field(default_factory=dict)
    # The counters among reward_metrics (summed over parts, not averaged).
    reward_counts: set[str] = field(default_factory=set)
    engine_logps: torch.Tensor | None = None  # [N, T] the engine's token log-probs (vllm; None: hf)
    # [N, T] 1 on tokens the model sampled, 0 on tool tokens (multi-turn); None: every completion token.
    model_mask: torch.Tensor | None = None
    # [N] bool: the completion (episode) hit its token budget (or turn limit) without ending by itself
    # (no EOS); ``algo.mask_truncated`` leaves these out of the loss. None: not recorded (hand-built).
    truncated: torch.Tensor | None = None
    # Per completion, of multi-turn episodes: turns, tool_calls, tool_errors, truncated, tool_tokens.
    episode_stats: dict[str, list[float]] = field(default_factory=dict)
    # Per completion, of multi-turn episodes: model_turns (the model's turns as text), tool_results.
    episode_texts: dict[str, list[list[str]]] = field(default_factory=dict)

    @property
    def judged(self) -> torch.Tensor:
        """[N] bool: some reward rule judged the completion (its reward is not NaN)."""
        return ~torch.isnan(self.rewards)

    @property
    def model_tokens(self) -> torch.Tensor:
        """[N, T] 1 on the tokens the model sampled: the ones the loss, the KL and every count see."""
        return self.completion_mask if self.model_mask is None else self.model_mask

    @property
    def lengths(self) -> torch.Tensor:
        """[N] tokens the model sampled per completion (tool tokens not counted)."""
        return self.model_tokens.sum(-1)

    @property
    def accuracy(self) -> float:
        """Fraction of completions that are correct (``rewards.correct``)."""
        right = correct(self.per_rule)
        return sum(right) / max(len(right), 1)

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on ``device`` (to send a rollout to another rank)."""
        return Rollout(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        )

    def select(self, index: torch.Tensor | Sequence[int]) -> Rollout:
        """The completions at ``index`` (whole groups, to keep advantages meaningful)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return Rollout(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            texts=[self.texts[i] for i in pick],
            rows=[self.rows[i] for i in pick],
            group_size=self.group_size,
            rewards=None if self.rewards is None else self.rewards[idx.to(self.rewards.device)],
            per_rule={k: [v[i] for i in pick] for k, v in self.per_rule.items()},
            reward_metrics=dict(self.reward_metrics),
            reward_counts=set(self.reward_counts),
            engine_logps=None if self.engine_logps is None else self.engine_logps[idx],
            model_mask=None if self.model_mask is None else self.model_mask[idx],
            truncated=None if self.truncated is None else self.truncated[idx.to(self.truncated.device)],
            episode_stats={k: [v[i] for i in pick] for k, v in self.episode_stats.items()},
            episode_texts={k: [v[i] for i in pick] for k, v in self.episode_texts.items()},
        )


def pad_cat(chunks: Sequence[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """[n_i, T_i] tensors as one [sum n_i, max T_i], padded with ``value`` on the right (or the left)."""
    width = max(c.size(1) for c in chunks)
    pads = [torch.full((c.size(0), width - c.size(1)), value, dtype=c.dtype, device=c.device) for c in chunks]
    return torch.cat([torch.cat([p, c] if left else [c, p], dim=1) for p, c in zip(pads, chunks)], dim=0)


def mean_weight(ro: Rollout, key: str) -> float:
    """How many completions the reward metric ``key`` of ``ro`` is a mean over: the judged ones for
    ``reward/total`` and ``reward/<rule>`` (``rewards.Rewarder``), all of them otherwise."""
    n = float(len(ro.texts))
    if key == "reward/total":
        return n - ro.reward_metrics.get("reward/unjudged", 0.0)
    return n - ro.reward_metrics.get(f"{key}/unjudged", 0.0)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Several scored rollouts as one: prompts re-padded on the left, completions on the right.

    Reward counters (``reward_counts``) are summed over the parts; the other reward metrics, means,
    are weighted by the completions each mean is over (``mean_weight``), so the result is the mean
    over the whole, however the parts (ranks, sampling rounds) are cut.
    """
    if len(parts) == 1:
        return parts[0]

    counts = set().union(*(p.reward_counts for p in parts))
    metrics: dict[str, float] = {}
    for key in {k for p in parts for k in p.reward_metrics}:
        have = [p for p in parts if key in p.reward_metrics]
        values = [p.reward_metrics[key] for p in have]
        if key in counts:
            metrics[key] = sum(values)
        else:  # a mean over each part's judged completions: weighted by them, so it is the whole's mean
            weights = [mean_weight(p, key) for p in have]
            metrics[key] = sum(w * v for w, v in zip(weights, values)) / max(sum(weights), 1.0)
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
        model_mask=None
        if any(p.model_mask is None for p in parts)
        else pad_cat([p.model_mask for p in parts], 0),
        truncated=None
        if any(p.truncated is None for p in parts)
        else torch.cat([p.truncated for p in parts]),
        episode_stats={k: [s for p in parts for s in p.episode_stats[k]] for k in parts[0].episode_stats},
        episode_texts={k: [s for p in parts for s in p.episode_texts[k]] for k in parts[0].episode_texts},
    )


def token_runs(ids: Sequence[int], model: Sequence[int]) -> list[tuple[bool, list[int]]]:
    """``ids`` cut where ``model`` (1: the model sampled the id) changes: (the model's?, the run's ids)."""
    pairs = zip(ids, model)
    return [(bool(m), [t for t, _ in run]) for m, run in itertools.groupby(pairs, key=lambda pair: pair[1])]


def transcript(ro: Rollout, i: int, tokenizer: Any) -> str:
    """Completion ``i`` whole: every token after the prompt decoded, the tool's included."""
    n = int(ro.completion_mask[i].sum())
    return tokenizer.decode(ro.completion_ids[i, :n].tolist(), skip_special_tokens=True)


def token_record(ro: Rollout, i: int) -> dict[str, list[int]]:
    """Completion ``i``'s ``token_ids`` (the ids after the prompt) and ``model_mask`` (1 where the model
    sampled the id), for the records a user checks token-exactness with."""
    n = int(ro.completion_mask[i].sum())
    model = ro.model_tokens[i, :n]
    return {"token_ids": ro.completion_ids[i, :n].tolist(), "model_mask": model.tolist()}
