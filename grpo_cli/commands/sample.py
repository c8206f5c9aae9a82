"""``grpo sample``: G completions for a few prompts, with rewards and group-relative advantages.

    grpo sample                                  # 2 arithmetic prompts x 8 completions, tiny model
    grpo sample sample.prompts=4 algo.group_size=16 reward=math_format

With ``env=`` an episode's turns are shown whole, the tool's answers in cyan.
The table per prompt is GRPO's first two steps made visible: the group's rewards, their mean and
std, and A_i = (r_i - mean) / std as ``core.loss.group_advantages`` computes it for training.
Also written to ``<run_dir>/samples.jsonl``, one completion per line.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from grpo_cli.commands.update import advantages_for
from grpo_cli.config import SampleRoot
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.engines import build_engine
from grpo_cli.envs.episode import episode_spec, extra_tokens
from grpo_cli.models import load_policy
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout.generate import PromptFormat, generate, longest_prompt, score
from grpo_cli.rollout.record import Rollout
from grpo_cli.run.progress import GenerationProgress
from grpo_cli.runtime.logs import setup_logging
from grpo_cli.runtime.rng import seed_everything


def _table(rollout: Rollout, advantages: torch.Tensor, g: int, prompt: str, tok: Any) -> Table:
    G = rollout.group_size
    rows = slice(g * G, (g + 1) * G)
    judged = rollout.rewards[rows][rollout.judged[rows]]
    mean = float(judged.mean()) if len(judged) else float("nan")
    std = float(judged.std()) if len(judged) > 1 else 0.0
    gold = rollout.rows[g * G].get("answer", "")
    table = Table(title=f"{prompt!r}  (gold {gold})", caption=f"group mean {mean:.3f}  std {std:.3f}")
    table.add_column("i", justify="right")
    table.add_column("completion")
    table.add_column("reward", justify="right")
    table.add_column("advantage", justify="right")
    table.add_column("tokens", justify="right")
    for i in range(rows.start, rows.stop):
        adv = float(advantages[i])
        color = "green" if adv > 0 else "red" if adv < 0 else "white"
        table.add_row(
            str(i - rows.start),
            _shown(rollout, i, tok),
            f"{float(rollout.rewards[i]):.3f}",
            f"[{color}]{adv:+.3f}[/{color}]",
            str(int(rollout.lengths[i])),
        )
    return table


def _shown(rollout: Rollout, i: int, tok: Any) -> str | Text:
    """Completion i as shown: its text, or for an episode its turns with the tool's answers in cyan."""
    if rollout.model_mask is None:
        return rollout.texts[i].strip()[:200]
    n = int(rollout.completion_mask[i].sum())
    pairs = zip(rollout.completion_ids[i, :n].tolist(), rollout.model_mask[i, :n].tolist())
    shown = Text()
    for is_model, run in itertools.groupby(pairs, key=lambda pair: pair[1]):
        shown.append(tok.decode([t for t, _ in run]), style=None if is_model else "cyan")
    shown.truncate(400)
    return shown


def run(cfg: SampleRoot, run_dir: str) -> list[dict[str, Any]]:
    """Sample, score, and show ``sample.prompts`` groups; returns the records written to samples.jsonl."""
    setup_logging()
    seed_everything(cfg.seed)
    rows = load_rows(cfg.data, cfg.sample.split)[: cfg.sample.prompts]
    prompts = [build_prompt(r, cfg.data.template) for r in rows]
    policy = load_policy(cfg.model, cfg.lora, beta=0.0, trainable=False)
    fmt = PromptFormat.of(cfg.data, cfg.model)
    longest = longest_prompt(policy.tokenizer, rows, fmt) + extra_tokens(cfg.env, cfg.rollout)
    engine = build_engine(policy, cfg.rollout, cfg.model, cfg.seed, longest)
    rewarder = build_rewarder(cfg.reward)
    G = cfg.algo.group_size
    try:
        progress = GenerationProgress(Console(stderr=True), live=cfg.console == "rich")
        with progress.task("sampling", len(rows) * G) as advance:
            episodes = episode_spec(cfg.env, policy, cfg.rollout)
            ro = generate(engine, policy, rows, fmt, G, cfg.rollout, progress=advance, episodes=episodes)
        rollout = score(ro, rewarder)
    finally:
        rewarder.close()
        engine.close()
    advantages, _ = advantages_for(rollout, G, cfg.algo.scale_rewards)
    console = Console()
    for g, prompt in enumerate(prompts):
        console.print(_table(rollout, advantages, g, prompt, policy.tokenizer))
    records = [
        {
            "prompt_index": i // rollout.group_size,
            "id": rollout.rows[i].get("id"),
            "prompt": prompts[i // rollout.group_size],
            "completion": rollout.texts[i],
            "reward": float(rollout.rewards[i]) if rollout.judged[i] else None,
            "advantage": float(advantages[i]),
            "tokens": int(rollout.lengths[i]),
            **{f"reward/{k}": v[i] for k, v in rollout.per_rule.items()},
            **{k: v[i] for k, v in rollout.episode_stats.items()},
        }
        for i in range(len(rollout.texts))
    ]
    out = Path(cfg.sample.out) if cfg.sample.out else Path(run_dir) / "samples.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    console.print(f"wrote {out}")
    return records
