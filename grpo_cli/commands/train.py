"""``grpo train``: build the run, then loop: a GRPO step (``commands.step``), metrics, the held-out
evaluation (``commands.heldout``), guards and checkpoints (``run``).

    grpo train                                   # tiny model, arithmetic, CPU, a few minutes
    grpo train model=qwen data=gsm8k algo.beta=0.0 train.steps=500
    grpo train algo=dapo                         # clip-higher, token mean, dynamic sampling
    grpo train <same overrides> hydra.run.dir=<run dir> train.resume=auto    # continue a stopped run

Under ``torchrun`` each rank runs this loop on its share of the step's prompts
(``runtime.distributed``); rank 0 writes the logs and checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from grpo_cli.commands.heldout import held_out_due, held_out_metrics
from grpo_cli.commands.step import train_step
from grpo_cli.commands.update import low_precision_warning, make_optimizer, trained_params
from grpo_cli.config import ConfigError, TrainConfig, TrainRoot
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.engines import build_engine
from grpo_cli.engines.server.http import SERVER_FAILED_EXIT, ServerError
from grpo_cli.envs.episode import episode_budget, episode_spec, extra_tokens
from grpo_cli.models import Policy, load_policy
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout.ahead import RolloutsAhead
from grpo_cli.rollout.batch import PromptOrder, RolloutSetup
from grpo_cli.rollout.generate import PromptFormat, longest_prompt
from grpo_cli.rollout.record import Rollout, transcript
from grpo_cli.run import checkpoint, resume
from grpo_cli.run.guards import RunStopped, StepGuard, stop_message, stop_reason
from grpo_cli.run.progress import LONG_GENERATION_TOKENS, GenerationProgress, cost_line
from grpo_cli.run.runlog import RunLogger, SilentLogger
from grpo_cli.runtime import distributed, rng
from grpo_cli.runtime.logs import setup_logging

log = logging.getLogger("grpo_cli")


@dataclass
class Trainer:
    """Everything one run holds; ``resume.trainer_state`` is what a checkpoint adds to the weights."""

    cfg: TrainRoot
    path: Path
    setup: RolloutSetup  # the policy, its engine, the training rows, the rewards
    order: PromptOrder
    optimizer: torch.optim.Optimizer
    scheduler: Any
    guard: StepGuard
    test_rows: list[dict]
    config_yaml: str
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    # Where held-out generation shows its progress (the console's live panel on rank 0).
    progress: GenerationProgress = field(default_factory=GenerationProgress)
    # rollout.max_staleness >= 1: the rollouts generated while the policy trains.
    ahead: RolloutsAhead | None = None

    @property
    def policy(self) -> Policy:
        return self.setup.policy

    def held_out(self) -> dict[str, float]:
        s, cfg = self.setup, self.cfg
        args = (s.engine, s.policy, self.test_rows, s.fmt, cfg.rollout, cfg.train, cfg.seed, s.rewarder)
        return held_out_metrics(*args, progress=self.progress, spec=s.spec)

    def save(self, step: int) -> Path | None:
        """A checkpoint of this step, unless the weights are not finite. Every rank calls it; rank 0 writes."""
        if not distributed.all_finite(trained_params(self.optimizer)):
            log.error(
                "step %d: the weights are not finite; no checkpoint written (the last one is kept)", step
            )
            return None
        model_state, optim_state = distributed.full_state(self.policy.wrapper, self.optimizer)
        state = resume.trainer_state(self, optim_state)
        path: Path | checkpoint.SaveFailed | None = None
        if distributed.world().is_main:
            model, tok, keep = self.policy.model, self.policy.tokenizer, self.cfg.train.keep_checkpoints
            try:
                path = checkpoint.save(
                    self.path, step, model, tok, state, self.config_yaml, keep, model_state=model_state
                )
            except checkpoint.SaveFailed as exc:
                path = exc  # every rank stops with it (``run``), not only this one
        path = distributed.broadcast_object(path)
        if isinstance(path, checkpoint.SaveFailed):
            raise path
        return path


def _init_world(tr: TrainConfig) -> distributed.World:
    """Join the process group; every rank must get whole groups of an equal share of the prompts."""
    world = distributed.init()
    if tr.prompts_per_step % world.size:
        raise ConfigError(
            f"train.prompts_per_step={tr.prompts_per_step}: must divide by the {world.size} ranks "
            "(each rank samples whole groups of an equal share)"
        )
    return world


def _load_model(cfg: TrainRoot, world: distributed.World, resume_from: Path | None) -> Policy:
    """The policy (from the checkpoint when resuming), wrapped for DDP / FSDP with several ranks."""
    tr = cfg.train
    sharded = world.enabled and tr.strategy == "fsdp"
    checkpoint_dir = str(resume_from) if resume_from else None
    policy = load_policy(cfg.model, cfg.lora, cfg.algo.beta, checkpoint=checkpoint_dir, stage_on_cpu=sharded)
    if world.enabled:
        policy.wrapper = distributed.wrap(policy.model, tr.strategy)
        if policy.ref_model is not None and tr.strategy == "fsdp":
            policy.ref_wrapper = distributed.wrap(policy.ref_model, tr.strategy, trainable=False)
    return policy


def _build(cfg: TrainRoot, run_path: Path) -> tuple[Trainer, dict[str, Any] | None]:
    """Load data, policy, engine, optimizer; restore a checkpoint when ``train.resume`` finds one."""
    tr = cfg.train
    if cfg.algo.max_completion_length is None:  # Dr. GRPO's constant: the longest episode we sample
        cfg.algo.max_completion_length = episode_budget(cfg.env, cfg.rollout)
    world = _init_world(tr)
    rng.seed_everything(cfg.seed)  # the same on every rank: LoRA's initial weights must agree
    train_rows = load_rows(cfg.data, cfg.data.train_split)
    test_rows = load_rows(cfg.data, cfg.data.test_split)[: tr.eval_problems]
    resume_from = resume.find_resume(tr, run_path)
    policy = _load_model(cfg, world, resume_from)
    # The run's one environment (its markers checked against the tokenizer before any engine starts).
    spec = episode_spec(cfg.env, policy, cfg.rollout)
    try:
        # Per-rank streams from here (dropout); rollouts have their own per-prompt streams (batch.draw_seed).
        rng.seed_everything(cfg.seed + world.rank)
        optimizer, scheduler = make_optimizer(policy, tr)
        if warning := low_precision_warning(trained_params(optimizer), tr.lr):
            log.warning(warning)
        fmt = PromptFormat.of(cfg.data, cfg.model)
        # After the weights are final (a resume's included): the engine starts with them (vllm: pushed).
        longest = longest_prompt(policy.tokenizer, train_rows + test_rows, fmt) if _sized(cfg) else 0
        longest += extra_tokens(cfg.env, cfg.rollout)  # an episode's budget beyond max_new_tokens
        engine = build_engine(
            policy, cfg.rollout, cfg.model, cfg.seed, longest, cfg.algo.group_size, str(run_path)
        )
        rewarder = build_rewarder(cfg.reward)
    except BaseException:
        spec.close()
        raise
    setup = RolloutSetup(engine, policy, train_rows, fmt, rewarder, cfg.rollout, cfg.algo, cfg.seed, spec)
    order = PromptOrder(len(train_rows), cfg.seed)
    trainer = Trainer(
        cfg, run_path, setup, order, optimizer, scheduler,
        StepGuard(tr.max_bad_steps, tr.zero_std_warn), test_rows, OmegaConf.to_yaml(OmegaConf.structured(cfg)),
    )  # fmt: skip
    if cfg.rollout.max_staleness:
        trainer.ahead = RolloutsAhead(setup, order, tr.prompts_per_step, cfg.rollout.max_staleness)
    if resume_from is None:
        return trainer, None
    try:
        state = checkpoint.load_state(resume_from)
        resume.restore(trainer, state)
    except BaseException:
        _close(trainer)
        raise
    resume.warn_config_changes(resume_from, trainer.config_yaml)
    log.info("resumed from %s at step %d", resume_from, state["step"])
    return trainer, state


def _sized(cfg: TrainRoot) -> bool:
    """Whether the engine needs the run's longest prompt up front (vllm without rollout.max_model_len)."""
    return cfg.rollout.engine == "vllm" and not cfg.rollout.max_model_len


def completion_records(
    step: int, ro: Rollout, advantages: torch.Tensor, template: str, tokenizer: Any = None
) -> list[dict[str, Any]]:
    """One ``completions.jsonl`` row per completion of the trained rollout: ``completion`` is the
    model's own words (what the rules judged); episodes with a tool add ``transcript``, every token
    after the prompt decoded, the tool's included (given ``tokenizer``)."""
    return [
        {
            "step": step,
            "prompt": build_prompt(ro.rows[i], template),
            "completion": ro.texts[i],
            **(
                {"transcript": transcript(ro, i, tokenizer)}
                if tokenizer and ro.model_mask is not None
                else {}
            ),
            "length": int(ro.lengths[i]),
            "reward": float(ro.rewards[i]),
            "rewards": {k: v[i] for k, v in ro.per_rule.items()},
            "advantage": float(advantages[i]),
        }
        for i in range(len(ro.texts))
    ]


def _loop(t: Trainer, logger: Any, stop: checkpoint.GracefulStop, start: int, resume_cmd: str) -> None:
    """Steps ``start + 1 .. train.steps``; raises RunStopped after a signal or too many bad steps."""
    tr = t.cfg.train
    for step in range(start + 1, tr.steps + 1):
        metrics, ro, advantages = train_step(t.setup, t.order, t.optimizer, t.scheduler, tr, t.ahead, step)
        if held_out_due(step, tr):
            t.evals[step] = t.held_out()
            metrics.update(t.evals[step])
        _log_step(t, logger, step, metrics, ro, advantages)
        stopping = stop_reason(t.guard, stop, step, tr)  # a signal arriving later is seen after the next step
        saved = None
        due = (tr.save_every and step % tr.save_every == 0) or step == tr.steps or stopping
        if due and not t.guard.bad_streak:  # no checkpoint while updates are being skipped
            saved = t.save(step)
        if saved or step == tr.steps or stopping:
            logger.write_curves()
        if stopping:
            raise RunStopped(stop_message(stopping[0], t.path, resume_cmd, stopping[1]))


def _log_step(
    t: Trainer, logger: Any, step: int, metrics: dict[str, float], ro: Rollout, advantages: torch.Tensor
) -> None:
    warnings = t.guard.record(step, metrics)  # adds bad_steps; every rank keeps the counters
    if not distributed.world().is_main:
        return
    records = completion_records(step, ro, advantages, t.cfg.data.template, t.policy.tokenizer)
    logger.log(step, metrics, example=records[step % len(records)])  # not random: the RNG belongs to training
    for w in warnings:
        log.warning(w)
    every = t.cfg.train.log_completions_every
    if every and step % every == 0:
        logger.log_completions(records)


def _prepare_run_dir(run_dir: str) -> Path:
    """The run directory, the same on every rank, with a killed save's leftovers removed."""
    run_path = Path(distributed.broadcast_object(str(Path(run_dir).resolve())))
    if distributed.world().is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(run_path)
    distributed.barrier()
    return run_path


def run(cfg: TrainRoot, run_dir: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train with GRPO; returns the held-out metrics by step. ``cfg`` is a validated TrainRoot.

    ``overrides``: the command-line overrides, for the printed resume command (by default the ones
    Hydra parsed). Raises ``RunStopped`` (a SystemExit) when a signal, bad steps or a checkpoint that
    cannot be written end the run early.
    """
    world = distributed.init()
    setup_logging(logging.INFO if world.is_main else logging.WARNING)
    run_path = _prepare_run_dir(run_dir)
    t, state = _build(cfg, run_path)
    start = state["step"] if state else 0
    resume_cmd = checkpoint.resume_command(run_path, overrides, launcher=distributed.launcher())
    try:
        logger = (
            RunLogger(
                run_path,
                cfg.train.steps,
                start,
                cfg.console,
                cfg.train.logger,
                state is not None,
                t.config_yaml,
            )
            if world.is_main
            else SilentLogger()
        )
    except BaseException:
        _close(t)
        raise
    # The held-out evaluation's cost said up front, its progress shown.
    if world.is_main:
        t.progress = GenerationProgress(logger.console, live=logger.panel is not None)
        _announce_held_out(cfg, len(t.test_rows), start)
    try:
        with checkpoint.GracefulStop() as stop:
            if state is None:
                if held_out_due(0, cfg.train):
                    t.evals[0] = t.held_out()
                    logger.log(0, t.evals[0])
            else:
                # Exactly where the checkpoint took it: the next draw is the one step start+1 made.
                rng.set_rng_state(resume.rank_rng(state, world))
            _loop(t, logger, stop, start, resume_cmd)
    except KeyboardInterrupt:
        code = checkpoint.EXIT_CODES.get(stop.signum, 130)
        reason = "interrupted twice: stopped at once, without saving"
        raise RunStopped(stop_message(reason, run_path, resume_cmd, code)) from None
    except checkpoint.SaveFailed as exc:  # no space left, no permission: stop, keep what was saved
        raise RunStopped(stop_message(str(exc), run_path, resume_cmd, checkpoint.SAVE_FAILED_EXIT)) from None
    except ServerError as exc:  # a generation server died, hung or refused a sync: stop, keep the checkpoints
        reason = f"generation server failed: {exc}"
        raise RunStopped(stop_message(reason, run_path, resume_cmd, SERVER_FAILED_EXIT)) from None
    finally:
        logger.close()
        _close(t)
    logger.print(_summary(t.evals))
    distributed.barrier()  # no rank leaves while another may still be saving
    return {"evals": t.evals, "run_dir": str(run_path)}


def _close(t: Trainer) -> None:
    """Release what the run built: the reward rules' workers, the engine, the environment (once each)."""
    if t.ahead is not None:
        t.ahead.close()  # first: its thread uses the rest
    t.setup.rewarder.close()
    t.setup.engine.close()
    t.setup.spec.close()


def _announce_held_out(cfg: TrainRoot, problems: int, start: int) -> None:
    """One line with the cost of the held-out evaluations this run will make, when they are long."""
    tr = cfg.train
    times = sum(held_out_due(s, tr) for s in range(start + (start > 0), tr.steps + 1))
    if not times or not problems:
        return
    line = cost_line(
        "held-out evaluation", problems, tr.eval_samples, True, cfg.rollout.max_new_tokens, times
    )
    if problems * (tr.eval_samples + 1) * cfg.rollout.max_new_tokens >= LONG_GENERATION_TOKENS:
        log.info("%s; train.eval_problems, train.eval_samples or train.eval_every=0 trim it", line)


def _summary(evals: dict[int, dict[str, float]]) -> str:
    if len(evals) < 2:
        return ""
    first, last = min(evals), max(evals)
    lines = [f"held-out, step {first} -> step {last}:"]
    for k in evals[first]:
        if k in evals[last]:
            lines.append(f"  {k:<28} {evals[first][k]:.3f} -> {evals[last][k]:.3f}")
    return "\n".join(lines)
