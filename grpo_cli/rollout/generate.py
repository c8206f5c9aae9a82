"""Prompts -> an engine -> one ``Rollout``: encoding, the engine call, the record, and scoring.

    ro = score(generate(engine, policy, rows, fmt, group_size, rollout_cfg, seeds=seeds), rewarder)

This is the one place a ``Rollout`` is made from what an engine sampled. Prompts are encoded once
(the chat template applied when the model asks for it) and handed to the engine as exact token ids;
completions come back as token ids and are decoded here, whole, so characters split over byte-level
tokens stay whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grpo_cli.config import DataConfig, ModelConfig, RolloutConfig
from grpo_cli.data import build_prompt
from grpo_cli.engines import Completion, Decoding, Engine, Progress, Request
from grpo_cli.envs.episode import Episode, EpisodeSpec, run_episodes
from grpo_cli.models import Policy
from grpo_cli.rollout.record import Rollout, pad_cat


@dataclass(frozen=True)
class PromptFormat:
    """How a data row becomes prompt text: the data group's template, then the model's chat template."""

    template: str = "{question}"
    chat_template: bool = False
    system_prompt: str | None = None  # with chat_template: the system turn (None: the template's default)

    @classmethod
    def of(cls, data: DataConfig, model: ModelConfig) -> PromptFormat:
        return cls(data.template, model.chat_template, model.system_prompt)

    def texts(self, tokenizer: Any, rows: Sequence[dict]) -> list[str]:
        """The prompt text of every row, chat-templated (a user turn, then the reply's opening) when asked."""
        prompts = [build_prompt(r, self.template) for r in rows]
        if not self.chat_template:
            return prompts
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]

    def encode(self, tokenizer: Any, rows: Sequence[dict]) -> list[list[int]]:
        """The exact prompt token ids of every row."""
        enc = tokenizer(self.texts(tokenizer, rows), add_special_tokens=False)
        return [list(ids) for ids in enc["input_ids"]]


def longest_prompt(tokenizer: Any, rows: Sequence[dict], fmt: PromptFormat) -> int:
    """The longest prompt of ``rows`` in tokens (0 for none): sizes an engine that needs it up front."""
    return max((len(ids) for ids in fmt.encode(tokenizer, rows)), default=0)


def generate(
    engine: Engine,
    policy: Policy,
    rows: Sequence[dict],
    fmt: PromptFormat,
    group_size: int,
    rollout: RolloutConfig,
    decoding: Decoding | None = None,
    seeds: Sequence[int] | None = None,
    progress: Progress | None = None,
    episodes: EpisodeSpec | None = None,
) -> Rollout:
    """G = ``group_size`` completions of each row's prompt, decoded, not yet scored.

    ``decoding``: how tokens are drawn (default: the ``rollout`` keys, sampled). ``seeds``: one per row,
    the seed of its group's sampling stream; None samples from the global torch RNG.
    ``progress(completions, tokens)`` is called as the engine finishes batches. ``episodes``:
    multi-turn episodes with a tool (``envs.episode``); None: one turn per completion.
    """
    tok = policy.tokenizer
    prompt_ids = fmt.encode(tok, rows)
    decoding = decoding or Decoding.of(rollout)
    if episodes is not None:
        eps = run_episodes(engine, episodes, prompt_ids, rows, group_size, decoding, seeds)
        if progress is not None:
            progress(len(eps), sum(len(e.ids) for e in eps))
        return episode_rollout(tok, rows, prompt_ids, eps, group_size, policy.device)
    stop = policy.eos_ids or (tok.eos_token_id,)
    requests = [
        Request(ids, group_size, rollout.max_new_tokens, stop, None if seeds is None else int(seeds[i]))
        for i, ids in enumerate(prompt_ids)
    ]
    completions = engine.generate(requests, decoding, progress)
    flat = [c for group in completions for c in group]
    return to_rollout(tok, rows, prompt_ids, flat, group_size, policy.device)


def to_rollout(
    tokenizer: Any,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    group_size: int,
    device: torch.device,
    model_masks: Sequence[Sequence[int]] | None = None,
) -> Rollout:
    """One unscored Rollout from P prompts' token ids and their P * G completions, group by group.

    Prompts are left-padded, completions right-padded; ``engine_logps`` [N, T] holds the engine's
    log-probs (0 on padding) when it returned them; ``model_masks``: 1 on the tokens the model
    sampled, per completion (multi-turn; None: all of them).
    """
    pad = tokenizer.pad_token_id
    p_ids = [_row(ids, pad, 1) for ids in prompt_ids for _ in range(group_size)]
    c_ids = [_row(c.token_ids, pad, 1) for c in completions]
    ids = pad_cat([i for i, _ in c_ids], pad)
    mask = pad_cat([m for _, m in c_ids], 0)
    logps = None
    if completions and all(c.logprobs is not None for c in completions):
        logps = pad_cat([torch.tensor([c.logprobs], dtype=torch.float32) for c in completions], 0).to(device)
    model = None
    if model_masks is not None:
        model = pad_cat([torch.tensor([m or [0]], dtype=torch.long) for m in model_masks], 0).to(device)
    return Rollout(
        prompt_ids=pad_cat([i for i, _ in p_ids], pad, left=True).to(device),
        prompt_mask=pad_cat([m for _, m in p_ids], 0, left=True).to(device),
        completion_ids=ids.to(device),
        completion_mask=mask.to(device),
        texts=tokenizer.batch_decode(ids.masked_fill(mask == 0, pad), skip_special_tokens=True),
        rows=[row for row in rows for _ in range(group_size)],
        group_size=group_size,
        engine_logps=logps,
        model_mask=model,
    )


def episode_rollout(
    tokenizer: Any,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    episodes: Sequence[Episode],
    group_size: int,
    device: torch.device,
) -> Rollout:
    """The Rollout of multi-turn episodes: every episode's ids after its prompt are one completion,
    ``model_mask`` tells the model's tokens from the tool's, ``episode_stats`` holds the counters."""
    completions = [Completion(e.ids, e.logprobs) for e in episodes]
    ro = to_rollout(tokenizer, rows, prompt_ids, completions, group_size, device, [e.model for e in episodes])
    ro.episode_stats = {
        "turns": [float(e.turns) for e in episodes],
        "tool_calls": [float(e.tool_calls) for e in episodes],
        "tool_errors": [float(e.tool_errors) for e in episodes],
        "truncated": [float(e.truncated) for e in episodes],
        "tool_tokens": [float(e.tool_tokens) for e in episodes],
    }
    return ro


def _row(ids: Sequence[int], pad: int, min_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask [1, len] of one sequence (``min_width`` columns at least, padded)."""
    width = max(len(ids), min_width)
    t = torch.full((1, width), pad, dtype=torch.long)
    m = torch.zeros((1, width), dtype=torch.long)
    t[0, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    m[0, : len(ids)] = 1
    return t, m


def rule_rows(rollout: Rollout) -> list[dict]:
    """The rows the reward rules see: with an ``episode`` entry (calls made, tool errors, turns) when
    the completions are episodes."""
    stats = rollout.episode_stats
    if not stats:
        return rollout.rows
    return [dict(r, episode={k: v[i] for k, v in stats.items()}) for i, r in enumerate(rollout.rows)]


def score(rollout: Rollout, rewarder: Any) -> Rollout:
    """Fill in rewards from the reward rules (None -> NaN: not judged). Rows of episodes carry an
    ``episode`` entry for the rules (``rewards.tools``)."""
    result = rewarder(rollout.texts, rule_rows(rollout))
    rollout.rewards = torch.tensor(
        [float("nan") if r is None else float(r) for r in result.total], dtype=torch.float32
    )
    rollout.per_rule = result.per_rule
    rollout.reward_metrics = result.metrics
    rollout.reward_counts = result.counts
    return rollout
