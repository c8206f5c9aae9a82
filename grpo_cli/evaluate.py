"""``grpo eval``: held-out accuracy and mean reward of the base model or a checkpoint.

    grpo eval                                             # the configured base model
    grpo eval checkpoint=outputs/<date>/<time>/checkpoint-200

Accuracy is the fraction of completions that the first reward rule scores 1 (for ``reward=math``:
the final answer is right). It is reported sampled (``eval.samples`` completions per problem at
``eval.temperature``) and greedy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from grpo_cli.data import build_prompt, load_rows
from grpo_cli.models import Policy, load_policy
from grpo_cli.rollout import generate, score

log = logging.getLogger("grpo_cli")


def _accuracy(rollout) -> tuple[float, float]:
    first = next(iter(rollout.per_rule.values()))
    acc = sum(s == 1.0 for s in first) / max(len(first), 1)
    return acc, float(torch.nanmean(rollout.rewards))


def held_out_metrics(policy: Policy, rows: list[dict], cfg: Any, rewarder: Any, samples: int | None = None,
                     temperature: float | None = None, greedy: bool = True) -> dict[str, float]:
    """Sampled and greedy accuracy and mean reward on ``rows``; restores the global RNG afterwards."""
    n = samples or getattr(getattr(cfg, "train", None), "eval_samples", 4)
    prompts = [build_prompt(r, cfg.data.template) for r in rows]
    rollout_cfg = replace(cfg.rollout, temperature=temperature or cfg.rollout.temperature)
    # Evaluation must not shift the training RNG stream: a run with evaluation every k steps samples
    # the same training completions as one without.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        acc, reward = _accuracy(score(generate(policy, rows, prompts, n, rollout_cfg, cfg.model.chat_template), rewarder))
        out = {"eval/accuracy": acc, "eval/reward": reward}
        if greedy:
            ro = score(generate(policy, rows, prompts, 1, rollout_cfg, cfg.model.chat_template, greedy=True), rewarder)
            out["eval/accuracy_greedy"] = _accuracy(ro)[0]
    return out


def run(cfg: Any, run_dir: str) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (or ``eval.checkpoint``), or the base model; print and save the metrics."""
    from rich.console import Console
    from rich.table import Table

    from grpo_cli.logging import setup_logging
    from grpo_cli.rewards import build_rewarder

    setup_logging()
    ev = cfg.eval
    ckpt = cfg.checkpoint or ev.checkpoint
    rows = load_rows(cfg.data, ev.split)
    if ev.limit:
        rows = rows[: ev.limit]
    policy = load_policy(cfg.model, cfg.lora, beta=0.0, checkpoint=ckpt, trainable=False)
    rewarder = build_rewarder(cfg.reward)
    try:
        metrics = held_out_metrics(policy, rows, cfg, rewarder, samples=ev.samples, temperature=ev.temperature,
                                   greedy=ev.greedy)
    finally:
        rewarder.close()
    table = Table(title=f"grpo eval: {len(rows)} problems x {ev.samples} samples")
    table.add_column("checkpoint")
    for k in metrics:
        table.add_column(k, justify="right")
    table.add_row(ckpt or "base", *(f"{v:.3f}" for v in metrics.values()))
    Console().print(table)
    out = Path(ev.out) if ev.out else Path(run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"results": [{"checkpoint": ckpt or "base", "n": ev.samples, "metrics": metrics}]}
    out.write_text(json.dumps(result, indent=2))
    return result
