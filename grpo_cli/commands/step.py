"""One GRPO step, read top to bottom as the paper's loop (DeepSeekMath, Algorithm 1, with the reward
model replaced by rule-based rewards):

    batch  = roll_out_batch(...)      # draw prompts, roll out G completions each from pi_old, score them
    inputs = prepare(...)             # A_i = (r_i - mean) / std per group; log-probs under pi_ref, pi_old
    stats  = update(...)              # mu x k optimizer steps (k mini-batches), each over micro-batches
    metrics = rollout metrics + loss statistics + timings

Held-out evaluation and checkpoints are the caller's (``commands.train``), not the step's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from grpo_cli.commands.passes import MicroBatching
from grpo_cli.commands.update import prepare, update
from grpo_cli.config import TrainConfig
from grpo_cli.rollout.ahead import RolloutsAhead
from grpo_cli.rollout.batch import PromptOrder, RolloutSetup, roll_out_batch, rollout_metrics
from grpo_cli.rollout.record import Rollout, concat_rollouts
from grpo_cli.runtime import distributed


def train_step(
    setup: RolloutSetup,
    order: PromptOrder,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tr: TrainConfig,
    ahead: RolloutsAhead | None = None,
    step: int = 0,
) -> tuple[dict[str, float], Rollout, torch.Tensor]:
    """One GRPO step on ``setup.policy`` (step number ``step``, from 1).

    ``ahead`` (``rollout.max_staleness`` >= 1): the batch comes from the rollouts generated ahead, and
    the generation of a later one runs during the update. Returns the step's metrics, and the trained
    rollout (all ranks') with its advantages [N], for the logs.
    """
    policy, algo, temp = setup.policy, setup.algo, setup.rollout.temperature
    t0 = time.perf_counter()
    if ahead is None:
        batch, timing = roll_out_batch(setup, order, tr.prompts_per_step), {}
    else:
        batch, timing = ahead.take(version=step - 1, launch=step < tr.steps)  # the last step: nothing ahead
    setup.engine.pause()  # vllm with rollout.sleep on CUDA: its memory back for the update
    t_gen = time.perf_counter() - t0
    micro = MicroBatching.for_model(tr.micro_batch_size, tr.micro_batch_tokens, policy.model)
    inputs = prepare(policy, batch.trained, algo, micro, temp, tr.steps_per_generation)
    stats = update(policy, optimizer, scheduler, inputs, algo, tr, temp)
    if ahead is not None:
        timing.update(ahead.finish())  # the weights change only once no generation is in flight
        t_gen += timing["idle_time"]  # gen_time: the trainer's wait for generation, as on-policy
    setup.engine.sync()  # the held-out evaluation and the next rollout sample the updated weights
    dt = time.perf_counter() - t0
    pad = policy.tokenizer.pad_token_id
    seen = gather_rollout(batch.seen, pad)
    metrics = {
        **rollout_metrics(seen),
        **stats,
        "step_time": dt,
        "gen_time": t_gen,
        "tokens_per_s": float(seen.lengths.sum()) / dt,
        **timing,
    }
    everyone = seen if not algo.dynamic_sampling else gather_rollout(batch.trained, pad)
    if algo.dynamic_sampling:
        metrics["sampling_rounds"] = float(batch.rounds)
        metrics["batch_zero_std_frac"] = rollout_metrics(everyone)["zero_std_frac"]
    advantages = torch.cat(distributed.gather_objects(inputs.advantages.cpu()))
    return metrics, everyone, advantages


def gather_rollout(ro: Rollout, pad_id: int) -> Rollout:
    """Every rank's rollout, concatenated in rank order (the 1-process layout); ``ro`` itself with one rank."""
    if not distributed.world().enabled:
        return ro
    return concat_rollouts(distributed.gather_objects(ro.to("cpu")), pad_id)
