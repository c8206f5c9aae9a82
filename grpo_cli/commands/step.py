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

import torch

from grpo_cli.commands.build import TrainRun
from grpo_cli.commands.passes import MicroBatching
from grpo_cli.commands.update import prepare, update
from grpo_cli.rollout.batch import batch_metrics, roll_out_batch
from grpo_cli.rollout.record import Rollout
from grpo_cli.runtime import distributed


def train_step(run: TrainRun, step: int) -> tuple[dict[str, float], Rollout, torch.Tensor]:
    """One GRPO step on ``run.policy`` (step number ``step``, from 1).

    With ``run.ahead`` (``rollout.max_staleness`` >= 1) the batch comes from the rollouts generated
    ahead, and the generation of a later one runs during the update. Returns the step's metrics, and the
    trained rollout (all ranks') with its advantages [N], for the logs.
    """
    policy, algo, tr, temp = run.policy, run.cfg.algo, run.cfg.train, run.cfg.rollout.temperature
    t0 = time.perf_counter()
    if run.ahead is None:
        batch, timing = roll_out_batch(run.source), {}
    else:
        # The last step launches no generation: nothing would train on it.
        batch, timing = run.ahead.take(version=step - 1, launch=step < tr.steps)
    run.engine.pause()  # vllm with rollout.sleep on CUDA: its memory back for the update
    t_gen = time.perf_counter() - t0
    micro = MicroBatching.of_train(tr, policy.model)
    inputs = prepare(policy, batch.trained, algo, micro, temp, seed=step)
    stats = update(policy, run.optimizer, run.scheduler, inputs, algo, tr, temp)
    if run.ahead is not None:
        timing.update(run.ahead.finish())  # the weights change only once no generation is in flight
        t_gen += timing["idle_time"]  # gen_time: the trainer's wait for generation, as on-policy
    run.engine.sync()  # the held-out evaluation and the next rollout sample the updated weights
    dt = time.perf_counter() - t0
    sampled, everyone, tokens = batch_metrics(batch, policy.tokenizer.pad_token_id, algo.dynamic_sampling)
    timings = {"step_time": dt, "gen_time": t_gen, "tokens_per_s": tokens / dt}
    metrics = {**sampled, **stats, **timings, **timing}
    advantages = torch.cat(distributed.gather_objects(inputs.advantages.cpu()))
    return metrics, everyone, advantages
