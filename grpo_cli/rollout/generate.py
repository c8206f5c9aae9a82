"""Prompts -> episodes on an engine -> one ``Rollout``: encoding, the episodes, the record, scoring.

    sampler = Sampler(engine, policy, fmt, spec, rollout_cfg)       # built once per command
    ro = score(sampler.generate(rows, group_size, seeds=seeds), rewarder)

One path for every rollout: a single turn is an episode with no tool stops (``envs.episode``), and
``episode_rollout`` is the one place a ``Rollout`` is made from what an engine sampled. Prompts are
encoded once (the chat template applied when the model asks for it) and handed to the engine as exact
token ids; completions come back as token ids and are decoded here, a turn at a time, so characters
split over byte-level tokens stay whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grpo_cli.config import DataConfig, EnvConfig, ModelConfig, RolloutConfig
from grpo_cli.data import build_prompt
from grpo_cli.engines import Decoding, Engine, Progress
from grpo_cli.envs.episode import Episode, EpisodeSpec, run_episodes
from grpo_cli.models import Policy
from grpo_cli.rollout.record import Rollout, pad_cat, token_runs


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


@dataclass(frozen=True)
class Sampler:
    """How a command turns rows into Rollouts: the engine that samples, the policy whose tokenizer
    encodes prompts and decodes completions, the prompt format, the episodes (``spec``: one turn, or
    turns with a tool; it owns the environment) and the ``rollout`` keys. Built once per command
    (``commands.build``); train, sample and eval hand it where rollouts are made."""

    engine: Engine
    policy: Policy
    fmt: PromptFormat
    spec: EpisodeSpec
    rollout: RolloutConfig

    def generate(
        self,
        rows: Sequence[dict],
        group_size: int,
        decoding: Decoding | None = None,
        seeds: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> Rollout:
        """G = ``group_size`` episodes of each row's prompt, decoded, not yet scored.

        ``decoding``: how tokens are drawn (default: the ``rollout`` keys, sampled). ``seeds``: one per
        row, the seed of its group's sampling stream; None samples from the global torch RNG.
        ``progress(completions, tokens)`` is called as the engine finishes batches.
        """
        tok = self.policy.tokenizer
        prompt_ids = self.fmt.encode(tok, rows)
        decoding = decoding or Decoding.of(self.rollout)
        spec = self.spec
        episodes = run_episodes(self.engine, spec, prompt_ids, rows, group_size, decoding, seeds, progress)
        device, tools = self.policy.device, spec.env is not None
        return episode_rollout(tok, rows, prompt_ids, episodes, group_size, device, tools)

    @classmethod
    def single_turn(
        cls, engine: Engine, policy: Policy, fmt: PromptFormat, rollout: RolloutConfig
    ) -> Sampler:
        """A sampler of single turns under the policy's EOS set (``env=none``), for tests and benchmarks
        that build no environment."""
        tok = policy.tokenizer
        spec = EpisodeSpec.of(EnvConfig(), tok, policy.eos_ids or (tok.eos_token_id,), rollout)
        return cls(engine, policy, fmt, spec, rollout)


def episode_rollout(
    tokenizer: Any,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    episodes: Sequence[Episode],
    group_size: int,
    device: torch.device,
    tools: bool = True,
) -> Rollout:
    """The one place a Rollout is made from what an engine sampled: P prompts' token ids and their
    P * G episodes, group by group; every episode's ids after its prompt are one completion.

    Prompts are left-padded, completions right-padded; ``engine_logps`` [N, T] holds the engine's
    log-probs (0 on padding) when it returned them. ``tools``: the episodes may hold tool tokens:
    ``model_mask`` tells the model's tokens from the tool's, ``texts`` hold the model's own words (its
    turns, decoded one by one, joined by a newline), ``episode_stats`` the counters and
    ``episode_texts`` each episode's turns and tool results. Without tools ``texts`` are the decoded
    completions and the episode fields stay empty (a single turn is all the model's).

    Seven arguments: what ``Sampler.generate`` holds after the engine answered (tokenizer, rows, prompt
    ids, episodes, G, the device, whether the episodes hold tools); tests build Rollouts from scripted
    episodes through it.
    """
    pad = tokenizer.pad_token_id
    p_ids = [_row(ids, pad, 1) for ids in prompt_ids for _ in range(group_size)]
    c_ids = [_row(e.ids, pad, 1) for e in episodes]
    ids = pad_cat([i for i, _ in c_ids], pad)
    mask = pad_cat([m for _, m in c_ids], 0)
    logps = None
    if episodes and all(e.logprobs is not None for e in episodes):
        logps = pad_cat([torch.tensor([e.logprobs], dtype=torch.float32) for e in episodes], 0).to(device)
    turns = [model_turns(tokenizer, e) for e in episodes] if tools else []
    ro = Rollout(
        prompt_ids=pad_cat([i for i, _ in p_ids], pad, left=True).to(device),
        prompt_mask=pad_cat([m for _, m in p_ids], 0, left=True).to(device),
        completion_ids=ids.to(device),
        completion_mask=mask.to(device),
        # A turn of EOS alone adds no line.
        texts=["\n".join(t for t in ts if t) for ts in turns]
        if tools
        else tokenizer.batch_decode(ids.masked_fill(mask == 0, pad), skip_special_tokens=True),
        rows=[row for row in rows for _ in range(group_size)],
        group_size=group_size,
        engine_logps=logps,
        truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool, device=device),
    )
    if not tools:
        return ro
    ro.model_mask = pad_cat([torch.tensor([e.model or [0]], dtype=torch.long) for e in episodes], 0).to(
        device
    )
    ro.episode_texts = {"model_turns": turns, "tool_results": [list(e.results) for e in episodes]}
    ro.episode_stats = {
        "turns": [float(e.turns) for e in episodes],
        "tool_calls": [float(e.tool_calls) for e in episodes],
        "tool_errors": [float(e.tool_errors) for e in episodes],
        "truncated": [float(e.truncated) for e in episodes],
        "tool_tokens": [float(e.tool_tokens) for e in episodes],
    }
    if episodes and episodes[0].env_reward is not None:  # an env with its own reward (``has_reward``)
        ro.episode_stats["env_reward"] = [float(e.env_reward or 0.0) for e in episodes]
    return ro


def model_turns(tokenizer: Any, episode: Episode) -> list[str]:
    """The model's turns of ``episode``, each run of sampled ids decoded on its own (special tokens
    dropped): the tool's tokens are not the model's words."""
    return [
        tokenizer.decode(run, skip_special_tokens=True)
        for is_model, run in token_runs(episode.ids, episode.model)
        if is_model
    ]


def _row(ids: Sequence[int], pad: int, min_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask [1, len] of one sequence (``min_width`` columns at least, padded)."""
    width = max(len(ids), min_width)
    t = torch.full((1, width), pad, dtype=torch.long)
    m = torch.zeros((1, width), dtype=torch.long)
    t[0, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    m[0, : len(ids)] = 1
    return t, m


def rule_rows(ro: Rollout) -> list[dict]:
    """The rows the reward rules see: for episodes with a tool, with an ``episode`` entry, the record
    beside the model's words: ``turns``, ``tool_calls``, ``tool_errors``, ``truncated``,
    ``tool_tokens`` (numbers; ``env_reward`` too, the environment's own reward, where it gives one),
    ``model_turns`` (the model's turns as text) and ``tool_results`` (the tool's text of each call)."""
    if not ro.episode_stats:
        return ro.rows
    record = {**ro.episode_stats, **ro.episode_texts}
    return [dict(r, episode={k: v[i] for k, v in record.items()}) for i, r in enumerate(ro.rows)]


def score(ro: Rollout, rewarder: Any) -> Rollout:
    """Fill in rewards from the reward rules (None -> NaN: not judged). The rules read ``ro.texts``, the
    model's own words; rows of episodes carry the ``episode`` record (``rule_rows``)."""
    result = rewarder(ro.texts, rule_rows(ro))
    ro.rewards = torch.tensor(
        [float("nan") if r is None else float(r) for r in result.total], dtype=torch.float32
    )
    ro.per_rule = result.per_rule
    ro.reward_metrics = result.metrics
    ro.reward_counts = result.counts
    return ro
