"""``grpo train``: rollout -> group advantages -> mu policy updates -> metrics -> checkpoint.

    grpo train                                   # tiny model, arithmetic, CPU, a few minutes
    grpo train model=qwen data=gsm8k algo.beta=0.0 train.steps=500
    grpo train algo=dapo                         # clip-higher, token mean, dynamic sampling
    grpo train <same overrides> hydra.run.dir=<run dir> train.resume=auto    # continue a stopped run

One step (DeepSeekMath, Algorithm 1, with the reward model replaced by rule-based rewards):
1. take ``train.prompts_per_step`` prompts and sample G = ``algo.group_size`` completions of each
   from pi_old (the current policy) and score them (``sample_step``: DAPO's dynamic sampling and
   overlong reward shaping are options there);
2. A_i = (r_i - mean(r)) / std(r) within each group (``core.loss.group_advantages``);
3. log-probs under pi_ref (adapter off) and, when mu > 1, under pi_old, without gradients;
4. mu = ``algo.num_iterations`` times: one optimizer step on ``core.loss.policy_loss`` over the whole
   batch, accumulated over micro-batches of ``train.micro_batch_size`` completions.
Log-probs run each group's prompt through the model once per micro-batch and its G completions on
the shared key/value cache (``models.grouped_completion_logprobs``).

Under ``torchrun`` each rank runs this loop on its share of the step's prompts
(``grpo_cli.distributed``); rank 0 writes the logs and checkpoints.

A completion no rule can judge (reward None) is left out of the loss and its reward replaced by its
group's mean, so it neither pulls nor pushes the others.

Robustness (issue 6):
- a step whose loss or gradient norm is not finite is not applied (``skipped`` = 1, ``bad_steps``
  counts them); after ``train.max_bad_steps`` such steps in a row the run stops (exit status 1) and no
  checkpoint is written during the streak, so the newest checkpoint holds the last good weights;
- the first Ctrl-C / SIGTERM finishes the step, saves a checkpoint, prints the resume command and exits
  130 / 143; a second one stops at once, without saving;
- a resumed run continues the RNG streams, the prompt order and the counters where the checkpoint left
  them, so its metric rows equal an uninterrupted run's (exactly on CPU; on GPU up to the
  non-determinism of CUDA kernels unless ``torch.use_deterministic_algorithms`` is on).

Test hook: ``GRPO_TEST_NAN_STEPS="3,4"`` multiplies the loss of those steps by NaN (tests of the guard).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo_cli import checkpoint, distributed
from grpo_cli.config import ConfigError
from grpo_cli.core.loss import aggregation_units, group_advantages, policy_loss
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.evaluate import held_out_metrics
from grpo_cli.logging import RunLogger, SilentLogger, setup_logging
from grpo_cli.models import Policy, grouped_completion_logprobs, load_policy, reference
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout import Rollout, concat_rollouts
from grpo_cli.sampling import PromptSampler, informative_groups, sample_step

log = logging.getLogger("grpo_cli")

NAN_STEPS_ENV = "GRPO_TEST_NAN_STEPS"
# Test hook: "<rank>:<step>" makes that rank raise during that step (a failing rank must end the job).
FAIL_RANK_ENV = "GRPO_TEST_FAIL_RANK"
# Warn about zero-variance groups after this many steps in a row above train.zero_std_warn, then at
# most once every ZERO_STD_REPEAT steps while it lasts.
ZERO_STD_PATIENCE, ZERO_STD_REPEAT = 5, 50
# Settings a resumed run may change without its metrics departing from the uninterrupted run's.
RESUME_FREE_KEYS = tuple(
    "train.steps train.resume train.save_every train.keep_checkpoints train.logger train.log_completions_every "
    "train.max_bad_steps train.zero_std_warn console".split()
)


class RunStopped(SystemExit):
    """Training stopped early (a signal, too many bad steps); ``code`` is the process exit status."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- the update


@dataclass
class Batch:
    """A scored rollout made ready for the loss: advantages and the mask of judged tokens."""

    rollout: Rollout
    advantages: torch.Tensor  # [N]
    loss_mask: torch.Tensor  # [N, T]
    ref_logps: torch.Tensor | None  # [N, T]
    old_logps: torch.Tensor | None  # [N, T]


def advantages_for(rollout: Rollout, group_size: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [N] and the judged flag [N]; unjudged rewards take their group's judged mean.

    ``scale=batch`` divides by the std of the whole step's rewards, every rank's included.
    """
    rewards = rollout.rewards.view(-1, group_size)
    judged = ~torch.isnan(rewards)
    count = judged.sum(1, keepdim=True)
    group_mean = torch.where(judged, rewards, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    filled = torch.where(judged, rewards, group_mean).view(-1)
    if scale == "batch" and distributed.world().enabled:
        everyone = distributed.gather_objects(filled)
        mine = distributed.world().rank
        start = sum(len(x) for x in everyone[:mine])
        adv = group_advantages(torch.cat(everyone), group_size, scale=scale)[start : start + len(filled)]
        return adv, judged.view(-1)
    return group_advantages(filled, group_size, scale=scale), judged.view(-1)


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _micro_logps(run: Any, rollout: Rollout, s: slice, temperature: float) -> torch.Tensor:
    """Log-probs [n, T] of the completions in ``s``, each group's prompt run through the model once.

    ``run``: ``Policy.run`` or a reference runner (``models.reference``). A micro-batch may start or
    end inside a group: its prompts are those of the groups it touches.
    """
    G = rollout.group_size
    first, last = s.start // G, (s.stop - 1) // G
    prompt_rows = slice(first * G, last * G + 1, G)  # one row per group touched by s
    index = torch.arange(s.start, s.stop, device=rollout.prompt_ids.device) // G - first
    prompt_ids, prompt_mask = rollout.prompt_ids[prompt_rows], rollout.prompt_mask[prompt_rows]
    if not torch.equal(prompt_ids[index], rollout.prompt_ids[s]):  # not laid out in groups: no sharing
        prompt_ids, prompt_mask = rollout.prompt_ids[s], rollout.prompt_mask[s]
        index = torch.arange(s.stop - s.start, device=index.device)
    return run(
        grouped_completion_logprobs,
        prompt_ids,
        prompt_mask,
        rollout.completion_ids[s],
        rollout.completion_mask[s],
        temperature=temperature,
        prompt_index=index,
    )


@torch.no_grad()
def _logps_no_grad(run: Any, rollout: Rollout, temperature: float, micro: int) -> torch.Tensor:
    n = rollout.completion_ids.size(0)
    return torch.cat([_micro_logps(run, rollout, s, temperature) for s in _micro_batches(n, micro)])


def prepare(policy: Policy, rollout: Rollout, cfg: Any) -> Batch:
    """Advantages, loss mask, and the no-grad log-probs under pi_ref (beta > 0) and pi_old (mu > 1)."""
    algo, micro, temp = cfg.algo, cfg.train.micro_batch_size, cfg.rollout.temperature
    adv, judged = advantages_for(rollout, algo.group_size, algo.scale_rewards)
    device = policy.device
    loss_mask = rollout.completion_mask.bool() & judged[:, None]
    ref = old = None
    if algo.beta > 0:
        with reference(policy) as ref_run:
            ref = _logps_no_grad(ref_run, rollout, temp, micro)
    if algo.num_iterations > 1:
        old = _logps_no_grad(policy.run, rollout, temp, micro)
    return Batch(rollout, adv.to(device), loss_mask.to(device), ref, old)


def update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: Batch,
    cfg: Any,
    poison: bool = False,
) -> dict[str, float]:
    """mu optimizer steps on the batch; returns loss statistics (means over micro-batches, last iteration).

    An iteration whose loss or gradient norm is not finite is not applied (``skipped`` = 1).
    ``poison`` (the NaN test hook) multiplies the loss by NaN.

    With several ranks the batch is this rank's share: the denominator counts every rank's units, so
    the rank losses add up to the global loss, and the wrappers' gradient average is undone by
    scaling each rank's loss by the world size before ``backward``. ``loss`` is the global loss, the
    other statistics the mean of the ranks'.
    """
    algo, tr = cfg.algo, cfg.train
    n = batch.rollout.completion_ids.size(0)
    world = distributed.world()
    # The whole batch's units (tokens or completions, every rank's), counted as policy_loss counts them.
    denom = max(float(distributed.all_sum(aggregation_units(batch.loss_mask, algo.aggregation))), 1.0)
    params = trained_params(optimizer)
    stats: dict[str, float] = {}
    skipped = False
    for _ in range(algo.num_iterations):
        totals: dict[str, float] = {}
        parts = _micro_batches(n, tr.micro_batch_size)
        for i, s in enumerate(parts):
            # Gradients cross ranks once per optimizer step, after the last micro-batch.
            with distributed.grad_sync(policy.engine, enabled=i == len(parts) - 1):
                logps = _micro_logps(policy.run, batch.rollout, s, cfg.rollout.temperature)
                old = None if batch.old_logps is None else batch.old_logps[s]
                ref = None if batch.ref_logps is None else batch.ref_logps[s]
                loss, st = policy_loss(
                    logps, old, ref, batch.advantages[s], batch.loss_mask[s], algo, denominator=denom
                )
                if poison:
                    loss = loss * float("nan")
                (loss * world.size).backward()
            for k, v in st.to_dict().items():
                totals[k] = totals.get(k, 0.0) + v / len(parts)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        if world.enabled:
            totals = _reduce_stats(totals, world.size)
        grad_norm = distributed.clip_grad_norm(params, tr.max_grad_norm)
        finite = math.isfinite(grad_norm) and math.isfinite(totals["loss"])
        if finite:
            optimizer.step()
        skipped = skipped or not finite
        optimizer.zero_grad(set_to_none=True)
        stats = {**totals, "grad_norm": grad_norm}
    scheduler.step()
    stats["skipped"] = float(skipped)
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats


def _reduce_stats(totals: dict[str, float], world_size: int) -> dict[str, float]:
    """The global loss (a sum over ranks) and the ranks' mean of every other statistic."""
    keys = sorted(totals)
    summed = distributed.all_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64)).tolist()
    return {k: v if k == "loss" else v / world_size for k, v in zip(keys, summed)}


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Metrics of everything sampled in a step: reward, accuracy (first rule == 1), zero-variance groups, length."""
    r = rollout.rewards
    return {
        "reward": float(torch.nanmean(r)),
        "reward_std": float(r[~torch.isnan(r)].std()) if (~torch.isnan(r)).sum() > 1 else 0.0,
        "accuracy": rollout.accuracy,
        "zero_std_frac": 1.0 - float(informative_groups(r, rollout.group_size).float().mean()),
        "completion_len": float(rollout.lengths.float().mean()),
        **rollout.reward_metrics,
    }


def trained_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates.

    Not ``model.parameters()``: between a forward and its backward FSDP swaps the registered
    parameters for unsharded ones, which never receive a gradient.
    """
    return [p for group in optimizer.param_groups for p in group["params"]]


def make_optimizer(policy: Policy, tr: Any, total_steps: int):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), weight_decay=tr.weight_decay
    )
    warm = max(tr.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
    return opt, sched


# ---------------------------------------------------------------------------- guards


@dataclass
class StepGuard:
    """Counts non-finite steps and watches the zero-variance fraction; saved in every checkpoint."""

    max_bad_steps: int
    zero_std_warn: float
    bad_total: int = 0
    bad_streak: int = 0
    zero_streak: int = 0
    last_zero_warning: int = -(10**9)

    def record(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Count this step (adds ``bad_steps`` to ``metrics``); returns the warnings to show."""
        warnings = []
        if metrics["skipped"]:
            self.bad_total, self.bad_streak = self.bad_total + 1, self.bad_streak + 1
            warnings.append(
                f"step {step}: non-finite loss or gradient (loss {metrics['loss']:.3g}, grad norm "
                f"{metrics['grad_norm']:.3g}): update skipped ({self.bad_streak} in a row, "
                f"{self.bad_total} in all; the run stops at {self.max_bad_steps} in a row)"
            )
        else:
            self.bad_streak = 0
        metrics["bad_steps"] = float(self.bad_total)
        self.zero_streak = self.zero_streak + 1 if metrics["zero_std_frac"] > self.zero_std_warn else 0
        if self.zero_streak >= ZERO_STD_PATIENCE and step - self.last_zero_warning >= ZERO_STD_REPEAT:
            self.last_zero_warning = step
            warnings.append(
                f"zero_std_frac above {self.zero_std_warn} for {self.zero_streak} steps: most groups "
                "have equal rewards and give no gradient; try algo.dynamic_sampling=true (algo=dapo), "
                "a larger algo.group_size, or data of a difficulty the model can sometimes solve"
            )
        return warnings

    @property
    def must_stop(self) -> bool:
        return self.bad_streak >= self.max_bad_steps

    def state_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("bad_total", "bad_streak", "zero_streak", "last_zero_warning")}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _nan_steps() -> set[int]:
    return {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").replace(" ", "").split(",") if s}


# ---------------------------------------------------------------------------- the run


@dataclass
class Trainer:
    """Everything one run holds; ``trainer_state`` is what a checkpoint adds to the weights."""

    cfg: Any
    path: Path
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: PromptSampler
    guard: StepGuard
    rewarder: Any
    train_rows: list[dict]
    test_rows: list[dict]
    config_yaml: str
    evals: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def _optimizer_format(self) -> str:
        """How the optimizer state is saved: gathered from the FSDP shards, or torch's own state dict."""
        return "fsdp_full" if self.policy.lockstep else "torch"

    def trainer_state(self, optimizer_state: dict | None = None) -> dict[str, Any]:
        return {
            "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            "optimizer_format": self._optimizer_format,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "guard": self.guard.state_dict(),
            "evals": self.evals,
            # Every rank's RNG (dropout draws differ per rank); rank r resumes with rng_ranks[r].
            "rng_ranks": distributed.gather_objects(checkpoint.rng_state()),
        }

    def restore(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizer_format", "torch")
        if saved != self._optimizer_format:
            raise ConfigError(
                f"the checkpoint's optimizer state was saved with train.strategy="
                f"{'fsdp' if saved == 'fsdp_full' else 'ddp (or 1 process)'}: resume it the same way"
            )
        distributed.load_optimizer_state(self.policy.engine, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.evals = dict(state.get("evals", {}))

    def save(self, step: int) -> Path | None:
        """A checkpoint of this step, unless the weights are not finite. Every rank calls it; rank 0 writes."""
        if not distributed.all_finite(trained_params(self.optimizer)):
            log.error(
                "step %d: the weights are not finite; no checkpoint written (the last one is kept)", step
            )
            return None
        model_state, optim_state = distributed.full_state(self.policy.engine, self.optimizer)
        state = self.trainer_state(optim_state)
        path = None
        if distributed.world().is_main:
            model, tok, keep = self.policy.model, self.policy.tokenizer, self.cfg.train.keep_checkpoints
            path = checkpoint.save(
                self.path, step, model, tok, state, self.config_yaml, keep, model_state=model_state
            )
        return distributed.broadcast_object(path)


def _build(cfg: Any, run_path: Path) -> tuple[Trainer, dict[str, Any] | None]:
    """Load data, policy, optimizer; restore a checkpoint when ``train.resume`` finds one."""
    from omegaconf import OmegaConf

    tr, algo = cfg.train, cfg.algo
    if algo.max_completion_length is None:  # Dr. GRPO's constant: the longest completion we sample
        algo.max_completion_length = cfg.rollout.max_new_tokens
    world = distributed.init()
    if cfg.train.prompts_per_step % world.size:
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step}: must divide by the {world.size} ranks "
            "(each rank samples whole groups of an equal share)"
        )
    seed_everything(cfg.seed)  # the same on every rank: LoRA's initial weights must agree
    train_rows = load_rows(cfg.data, cfg.data.train_split)
    test_rows = load_rows(cfg.data, cfg.data.test_split)[: tr.eval_problems]
    resume_from = checkpoint.resolve_resume(tr.resume, run_path)
    existing = checkpoint.list_checkpoints(run_path)
    if resume_from is None and existing and not tr.resume:
        # Starting over would truncate this run's metrics and overwrite its checkpoints.
        raise ConfigError(
            f"{run_path} already holds {existing[-1].name}: continue it with train.resume=auto, "
            "or give the new run another hydra.run.dir"
        )
    if resume_from is None and tr.resume == "auto":
        log.info("no checkpoint in %s yet: starting from step 0", run_path)
    sharded = world.enabled and tr.strategy == "fsdp"
    policy = load_policy(
        cfg.model,
        cfg.lora,
        algo.beta,
        checkpoint=str(resume_from) if resume_from else None,
        stage_on_cpu=sharded,
    )
    if world.enabled:
        policy.engine = distributed.wrap(policy.model, tr.strategy)
        if policy.ref_model is not None and tr.strategy == "fsdp":
            policy.ref_engine = distributed.wrap(policy.ref_model, tr.strategy, trainable=False)
    # Per-rank streams from here (dropout); sampling has its own per-prompt streams (sampling.draw_seed).
    seed_everything(cfg.seed + world.rank)
    optimizer, scheduler = make_optimizer(policy, tr, tr.steps)
    trainer = Trainer(
        cfg,
        run_path,
        policy,
        optimizer,
        scheduler,
        PromptSampler(len(train_rows), cfg.seed),
        StepGuard(tr.max_bad_steps, tr.zero_std_warn),
        build_rewarder(cfg.reward),
        train_rows,
        test_rows,
        OmegaConf.to_yaml(OmegaConf.structured(cfg)),
    )
    if resume_from is None:
        return trainer, None
    state = checkpoint.load_state(resume_from)
    trainer.restore(state)
    old_yaml = (resume_from / "config.yaml").read_text() if (resume_from / "config.yaml").is_file() else ""
    changes = checkpoint.config_changes(old_yaml, trainer.config_yaml, RESUME_FREE_KEYS) if old_yaml else []
    if changes:
        log.warning(
            "resuming with changed settings (metrics will differ from an uninterrupted run): %s",
            "; ".join(changes),
        )
    log.info("resumed from %s at step %d", resume_from, state["step"])
    return trainer, state


def _cpu(ro: Rollout) -> Rollout:
    """A copy of ``ro`` with its tensors on the CPU (to send it to another rank)."""
    return Rollout(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(ro).items()})


def gather_rollout(ro: Rollout, pad_id: int) -> Rollout:
    """Every rank's rollout, concatenated in rank order (the 1-process layout); ``ro`` itself with one rank."""
    if not distributed.world().enabled:
        return ro
    return concat_rollouts(distributed.gather_objects(_cpu(ro)), pad_id)


def train_step(t: Trainer, step: int) -> tuple[dict[str, float], Rollout, torch.Tensor]:
    """One GRPO step: sample and score, advantages, mu updates.

    Returns the step's metrics, and the batch (all ranks') with its advantages [N], for the logs.
    """
    _fail_hook(step)
    t0 = time.perf_counter()
    sampled = sample_step(t.policy, t.sampler, t.train_rows, t.rewarder, t.cfg)
    t_gen = time.perf_counter() - t0
    batch = prepare(t.policy, sampled.batch, t.cfg)
    stats = update(t.policy, t.optimizer, t.scheduler, batch, t.cfg, poison=step in _nan_steps())
    dt = time.perf_counter() - t0
    pad = t.policy.tokenizer.pad_token_id
    seen = gather_rollout(sampled.seen, pad)
    metrics = {
        **rollout_metrics(seen),
        **stats,
        "step_time": dt,
        "gen_time": t_gen,
        "tokens_per_s": float(seen.lengths.sum()) / dt,
    }
    everyone = seen if not t.cfg.algo.dynamic_sampling else gather_rollout(sampled.batch, pad)
    if t.cfg.algo.dynamic_sampling:
        metrics["sampling_rounds"] = float(sampled.rounds)
        metrics["batch_zero_std_frac"] = rollout_metrics(everyone)["zero_std_frac"]
    advantages = torch.cat(distributed.gather_objects(batch.advantages.cpu()))
    tr = t.cfg.train
    if step == tr.steps or (tr.eval_every and step % tr.eval_every == 0):
        t.evals[step] = held_out_metrics(t.policy, t.test_rows, t.cfg, t.rewarder)
        metrics.update(t.evals[step])
    return metrics, everyone, advantages


def _fail_hook(step: int) -> None:
    spec = os.environ.get(FAIL_RANK_ENV, "")
    if spec and tuple(map(int, spec.split(":"))) == (distributed.world().rank, step):
        raise RuntimeError(f"{FAIL_RANK_ENV}: rank {distributed.world().rank} fails at step {step}")


def completion_records(
    step: int, ro: Rollout, advantages: torch.Tensor, template: str
) -> list[dict[str, Any]]:
    """One ``completions.jsonl`` row per completion of the batch."""
    return [
        {
            "step": step,
            "prompt": build_prompt(ro.rows[i], template),
            "completion": ro.texts[i],
            "length": int(ro.lengths[i]),
            "reward": float(ro.rewards[i]),
            "rewards": {k: v[i] for k, v in ro.per_rule.items()},
            "advantage": float(advantages[i]),
        }
        for i in range(len(ro.texts))
    ]


def _loop(t: Trainer, logger: RunLogger, stop: checkpoint.GracefulStop, start: int, resume_cmd: str) -> None:
    """Steps ``start + 1 .. train.steps``; raises RunStopped after a signal or too many bad steps."""
    tr = t.cfg.train
    for step in range(start + 1, tr.steps + 1):
        metrics, ro, advantages = train_step(t, step)
        _log_step(t, logger, step, metrics, ro, advantages)
        stopping = _stop_reason(t, stop, step)  # a signal arriving later is seen after the next step
        saved = None
        due = (tr.save_every and step % tr.save_every == 0) or step == tr.steps or stopping
        if due and not t.guard.bad_streak:  # no checkpoint while updates are being skipped
            saved = t.save(step)
        if saved or step == tr.steps or stopping:
            logger.write_curves()
        if stopping:
            raise RunStopped(_stop_message(stopping[0], t.path, resume_cmd, stopping[1]))


def _log_step(
    t: Trainer, logger: Any, step: int, metrics: dict[str, float], ro: Rollout, advantages: torch.Tensor
) -> None:
    warnings = t.guard.record(step, metrics)  # adds bad_steps; every rank keeps the counters
    if not distributed.world().is_main:
        return
    records = completion_records(step, ro, advantages, t.cfg.data.template)
    logger.log(step, metrics, example=records[step % len(records)])  # not random: the RNG belongs to training
    for w in warnings:
        log.warning(w)
    every = t.cfg.train.log_completions_every
    if every and step % every == 0:
        logger.log_completions(records)


def _stop_reason(t: Trainer, stop: checkpoint.GracefulStop, step: int) -> tuple[str, int] | None:
    """Why the run must stop after this step, and its exit status; None to go on."""
    if t.guard.must_stop:
        return (
            f"stopped: {t.guard.bad_streak} steps in a row had a non-finite loss or gradient "
            f"(train.max_bad_steps={t.cfg.train.max_bad_steps}); lower train.lr or check the rewards",
            1,
        )
    # torchrun passes a signal to every rank, but not at the same instant: agree on it.
    signum = int(distributed.all_max(stop.signum or 0))
    if signum and step < t.cfg.train.steps:  # a signal during the last step: just finish
        return f"stopped by {signal.Signals(signum).name} after step {step}", checkpoint.EXIT_CODES.get(
            signum, 1
        )
    return None


def _stop_message(reason: str, run_path: Path, resume_cmd: str, code: int) -> int:
    """Say why the run stopped and how to continue it (on stderr, from rank 0); returns the exit status."""
    if not distributed.world().is_main:
        return code
    found = checkpoint.list_checkpoints(run_path)
    where = f"last checkpoint: {found[-1]}" if found else "no checkpoint was written yet"
    log.error("%s; %s\nresume with:\n  %s", reason, where, resume_cmd)
    return code


def run(cfg: Any, run_dir: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train with GRPO; returns the held-out metrics by step. ``cfg`` is a validated TrainRoot.

    ``overrides``: the command-line overrides, for the printed resume command (by default the ones
    Hydra parsed). Raises ``RunStopped`` (a SystemExit) when a signal or bad steps end the run early.
    """
    world = distributed.init()
    setup_logging(logging.INFO if world.is_main else logging.WARNING)
    run_path = Path(distributed.broadcast_object(str(Path(run_dir).resolve())))
    if world.is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(run_path)
    distributed.barrier()
    t, state = _build(cfg, run_path)
    start = state["step"] if state else 0
    resume_cmd = checkpoint.resume_command(run_path, overrides, launcher=distributed.launcher())
    resumed = state is not None
    logger = (
        RunLogger(run_path, cfg.train.steps, start, cfg.console, cfg.train.logger, resumed=resumed)
        if world.is_main
        else SilentLogger()
    )
    try:
        with checkpoint.GracefulStop() as stop:
            if state is None:
                t.evals[0] = held_out_metrics(t.policy, t.test_rows, cfg, t.rewarder)
                logger.log(0, t.evals[0])
            else:
                # Exactly where the checkpoint took it: the next draw is the one step start+1 made.
                checkpoint.set_rng_state(_rank_rng(state, world))
            _loop(t, logger, stop, start, resume_cmd)
    except KeyboardInterrupt:
        code = checkpoint.EXIT_CODES.get(stop.signum, 130)
        raise RunStopped(
            _stop_message("interrupted twice: stopped at once, without saving", run_path, resume_cmd, code)
        ) from None
    finally:
        logger.close()
        t.rewarder.close()
    logger.print(_summary(t.evals))
    distributed.barrier()  # no rank leaves while another may still be saving
    return {"evals": t.evals, "run_dir": str(run_path)}


def _rank_rng(state: dict[str, Any], world: distributed.World) -> dict[str, Any]:
    """This rank's RNG state in a checkpoint; with another world size, rank 0's on every rank (said once)."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == world.size:
        return ranks[world.rank]
    if world.is_main:
        log.warning(
            "the checkpoint was written by %d ranks, this run has %d: sampling continues exactly "
            "(its streams are per prompt), dropout draws do not",
            len(ranks),
            world.size,
        )
    return ranks[0]


def _summary(evals: dict[int, dict[str, float]]) -> str:
    if len(evals) < 2:
        return ""
    first, last = min(evals), max(evals)
    lines = [f"held-out, step {first} -> step {last}:"]
    for k in evals[first]:
        if k in evals[last]:
            lines.append(f"  {k:<28} {evals[first][k]:.3f} -> {evals[last][k]:.3f}")
    return "\n".join(lines)
