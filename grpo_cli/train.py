"""``grpo train``: rollout -> group advantages -> mu policy updates -> metrics -> checkpoint.

    grpo train                                   # tiny model, arithmetic, CPU, a few minutes
    grpo train model=qwen data=gsm8k algo.beta=0.0 train.steps=500

One step (DeepSeekMath, Algorithm 1, with the reward model replaced by rule-based rewards):
1. take ``train.prompts_per_step`` prompts and sample G = ``algo.group_size`` completions of each
   from pi_old (the current policy);
2. score them; A_i = (r_i - mean(r)) / std(r) within each group (``core.loss.group_advantages``);
3. log-probs under pi_ref (adapter off) and, when mu > 1, under pi_old, without gradients;
4. mu = ``algo.num_iterations`` times: one optimizer step on ``core.loss.policy_loss`` over the whole
   batch, accumulated over micro-batches of ``train.micro_batch_size`` completions.

A completion no rule can judge (reward None) is left out of the loss and its reward replaced by its
group's mean, so it neither pulls nor pushes the others.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo_cli import checkpoint
from grpo_cli.core.loss import group_advantages, policy_loss
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.evaluate import held_out_metrics
from grpo_cli.logging import RunLogger, setup_logging
from grpo_cli.models import Policy, completion_logprobs, load_policy, reference
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout import Rollout, generate, score

log = logging.getLogger("grpo_cli")


class PromptSampler:
    """Shuffled passes over the training rows; its state (epoch, position) is part of a checkpoint."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch, self.pos = num_rows, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        return random.Random(self.seed * 100_003 + self.epoch).sample(range(self.num_rows), self.num_rows)

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Batch:
    """A scored rollout made ready for the loss: advantages and the mask of judged tokens."""

    rollout: Rollout
    advantages: torch.Tensor  # [N]
    loss_mask: torch.Tensor  # [N, T]
    ref_logps: torch.Tensor | None  # [N, T]
    old_logps: torch.Tensor | None  # [N, T]


def advantages_for(rollout: Rollout, group_size: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [N] and the judged flag [N]; unjudged rewards take their group's judged mean."""
    rewards = rollout.rewards.view(-1, group_size)
    judged = ~torch.isnan(rewards)
    count = judged.sum(1, keepdim=True)
    group_mean = torch.where(judged, rewards, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    filled = torch.where(judged, rewards, group_mean)
    return group_advantages(filled.view(-1), group_size, scale=scale), judged.view(-1)


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _logps_no_grad(model: Any, rollout: Rollout, temperature: float, micro: int) -> torch.Tensor:
    ids, mask = rollout.input_ids()
    L = rollout.prompt_ids.size(1)
    return torch.cat([completion_logprobs(model, ids[s], mask[s], L, temperature) for s in _micro_batches(len(ids), micro)])


def prepare(policy: Policy, rollout: Rollout, cfg: Any) -> Batch:
    """Advantages, loss mask, and the no-grad log-probs under pi_ref (beta > 0) and pi_old (mu > 1)."""
    algo, micro, temp = cfg.algo, cfg.train.micro_batch_size, cfg.rollout.temperature
    adv, judged = advantages_for(rollout, algo.group_size, algo.scale_rewards)
    device = policy.device
    loss_mask = rollout.completion_mask.bool() & judged[:, None]
    ref = old = None
    if algo.beta > 0:
        with reference(policy) as ref_model:
            ref = _logps_no_grad(ref_model, rollout, temp, micro)
    if algo.num_iterations > 1:
        old = _logps_no_grad(policy.model, rollout, temp, micro)
    return Batch(rollout, adv.to(device), loss_mask.to(device), ref, old)


def loss_denominator(loss_mask: torch.Tensor, aggregation: str) -> float:
    """Normalising units over the whole batch: tokens for token_mean, else sequences with a token."""
    if aggregation == "token_mean":
        return float(loss_mask.sum())
    return float((loss_mask.sum(-1) > 0).sum())


def update(policy: Policy, optimizer: torch.optim.Optimizer, scheduler: Any, batch: Batch, cfg: Any) -> dict[str, float]:
    """mu optimizer steps on the batch; returns loss statistics (means over micro-batches, last iteration)."""
    algo, tr = cfg.algo, cfg.train
    ids, attn = batch.rollout.input_ids()
    L = batch.rollout.prompt_ids.size(1)
    denom = max(loss_denominator(batch.loss_mask, algo.aggregation), 1.0)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    stats: dict[str, float] = {}
    for _ in range(algo.num_iterations):
        totals: dict[str, float] = {}
        parts = _micro_batches(len(ids), tr.micro_batch_size)
        for s in parts:
            logps = completion_logprobs(policy.model, ids[s], attn[s], L, cfg.rollout.temperature)
            old = None if batch.old_logps is None else batch.old_logps[s]
            ref = None if batch.ref_logps is None else batch.ref_logps[s]
            loss, st = policy_loss(logps, old, ref, batch.advantages[s], batch.loss_mask[s], algo, denominator=denom)
            loss.backward()
            for k, v in st.to_dict().items():
                totals[k] = totals.get(k, 0.0) + v / len(parts)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm))
        finite = math.isfinite(grad_norm) and math.isfinite(totals["loss"])
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = {**totals, "grad_norm": grad_norm, "skipped": 0.0 if finite else 1.0}
    scheduler.step()
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    r = rollout.rewards
    groups = r.view(-1, rollout.group_size)
    first_rule = next(iter(rollout.per_rule.values()), None)
    correct = [s == 1.0 for s in first_rule] if first_rule is not None else []
    zero_std = (groups.max(1).values - groups.min(1).values).abs() < 1e-8
    return {
        "reward": float(torch.nanmean(r)),
        "reward_std": float(r[~torch.isnan(r)].std()) if (~torch.isnan(r)).sum() > 1 else 0.0,
        "accuracy": sum(correct) / max(len(correct), 1),
        "zero_std_frac": float(zero_std.float().mean()),
        "completion_len": float(rollout.lengths.float().mean()),
        **rollout.reward_metrics,
    }


def make_optimizer(policy: Policy, tr: Any, total_steps: int):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), weight_decay=tr.weight_decay)
    warm = max(tr.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
    return opt, sched


def run(cfg: Any, run_dir: str) -> dict[str, Any]:
    """Train with GRPO; returns the before/after held-out metrics. ``cfg`` is a validated TrainRoot."""
    from omegaconf import OmegaConf

    setup_logging()
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    tr, algo = cfg.train, cfg.algo
    if algo.max_completion_length is None:  # Dr. GRPO's constant: the longest completion we sample
        algo.max_completion_length = cfg.rollout.max_new_tokens
    seed_everything(cfg.seed)
    train_rows = load_rows(cfg.data, cfg.data.train_split)
    test_rows = load_rows(cfg.data, cfg.data.test_split)[: tr.eval_problems]
    resume_from = checkpoint.resolve_resume(tr.resume, run_path)
    policy = load_policy(cfg.model, cfg.lora, algo.beta, checkpoint=str(resume_from) if resume_from else None)
    rewarder = build_rewarder(cfg.reward)
    optimizer, scheduler = make_optimizer(policy, tr, tr.steps)
    sampler = PromptSampler(len(train_rows), cfg.seed)
    start = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
        log.info("resumed from %s at step %d", resume_from, start)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    logger = RunLogger(run_path, tr.steps, start, cfg.console)
    evals: dict[int, dict[str, float]] = {}
    try:
        if resume_from is None:
            evals[0] = held_out_metrics(policy, test_rows, cfg, rewarder)
            logger.log(0, evals[0])
        if resume_from is not None:
            checkpoint.set_rng_state(state["rng"])
        for step in range(start + 1, tr.steps + 1):
            t0 = time.perf_counter()
            rows = [train_rows[i] for i in sampler.take(tr.prompts_per_step)]
            prompts = [build_prompt(r, cfg.data.template) for r in rows]
            rollout = score(generate(policy, rows, prompts, algo.group_size, cfg.rollout, cfg.model.chat_template),
                            rewarder)
            t_gen = time.perf_counter() - t0
            stats = update(policy, optimizer, scheduler, prepare(policy, rollout, cfg), cfg)
            dt = time.perf_counter() - t0
            metrics = {**rollout_metrics(rollout), **stats, "step_time": dt, "gen_time": t_gen,
                       "tokens_per_s": float(rollout.lengths.sum()) / dt}
            if tr.eval_every and step % tr.eval_every == 0 and step != tr.steps:
                evals[step] = held_out_metrics(policy, test_rows, cfg, rewarder)
                metrics.update(evals[step])
            if step == tr.steps:
                evals[step] = held_out_metrics(policy, test_rows, cfg, rewarder)
                metrics.update(evals[step])
            logger.log(step, metrics)
            if (tr.save_every and step % tr.save_every == 0) or step == tr.steps:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "sampler": sampler.state_dict()}
                checkpoint.save(run_path, step, policy.model, policy.tokenizer, state, config_yaml, tr.keep_checkpoints)
    finally:
        logger.close()
        rewarder.close()
    summary = _summary(evals)
    logger.print(summary)
    return {"evals": evals, "run_dir": str(run_path)}


def _summary(evals: dict[int, dict[str, float]]) -> str:
    if len(evals) < 2:
        return ""
    first, last = min(evals), max(evals)
    lines = [f"held-out, step {first} -> step {last}:"]
    for k in evals[first]:
        if k in evals[last]:
            lines.append(f"  {k:<28} {evals[first][k]:.3f} -> {evals[last][k]:.3f}")
    return "\n".join(lines)
