"""The run object: one function builds what a command needs, one ``with`` closes it.

    with build_run(cfg) as run:                  # SampleRoot / EvalRoot: rows, policy, episodes, engine, rewards
        ro = score(run.sampler.generate(run.rows, G), run.rewarder)
    with build_train_run(cfg, run_path) as run:  # TrainRoot: + optimizer, schedule, prompt order, batches ahead
        metrics, ro, advantages = train_step(run, step)

torchtune's recipe class is the model: one owner of setup, the loop's state and cleanup. Every command
builds in one order: the rows, the policy, the episodes' spec (it owns the environment), for train the
optimizer and its schedule, the engine (after the weights are final: vLLM starts with them), the reward
rules, for train the prompt order, the batches generated ahead and the checkpoint's state. Closing
runs in reverse, once, by ``Run.__exit__``, also when a step of the build fails half-way: what was
built is closed, the rest never existed. ``grpo eval`` over several checkpoints keeps the rows, the
spec and the rules, and swaps the policy and its engine (``Run.load_checkpoint``).
"""

from __future__ import annotations

import gc
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from grpo_cli.commands.heldout import held_out_metrics
from grpo_cli.commands.update import low_precision_warning, make_optimizer, trained_params
from grpo_cli.config import ConfigError, EvalRoot, SampleRoot, TrainRoot
from grpo_cli.data import load_rows
from grpo_cli.engines import Engine, build_engine
from grpo_cli.envs.episode import EpisodeSpec, episode_budget, episode_spec, extra_tokens
from grpo_cli.models import Policy, load_policy
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout.ahead import RolloutsAhead
from grpo_cli.rollout.batch import BatchSource, PromptOrder
from grpo_cli.rollout.generate import PromptFormat, Sampler, longest_prompt
from grpo_cli.run import checkpoint, resume
from grpo_cli.run.guards import StepGuard
from grpo_cli.run.progress import GenerationProgress
from grpo_cli.runtime import distributed, rng

log = logging.getLogger("grpo_cli")


@dataclass
class Run:
    """What one command built, closed in reverse order by ``with`` (``closing``).

    ``rows``: the rows the command samples (train: the training rows; sample: its prompts; eval: the
    split). ``held_out``: the problems the held-out evaluation samples (train: ``train.eval_problems``
    of the test split; eval: ``eval.problems`` of the split; sample: none).
    """

    cfg: Any
    rows: list[dict]
    held_out: list[dict]
    policy: Policy
    spec: EpisodeSpec
    fmt: PromptFormat
    engine: Engine
    rewarder: Any
    closing: ExitStack

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.engine, self.policy, self.fmt, self.spec, self.cfg.rollout)

    def load_checkpoint(self, name: str) -> None:
        """``grpo eval``: sample from checkpoint ``name`` ("base": the configured model) from now on; the
        previous policy and its engine are released first (two models need not fit at once)."""
        self.engine.close()
        del self.policy, self.engine
        gc.collect()
        self.policy = _eval_policy(self.cfg, name)
        self.engine = _engine(self.cfg, self.policy, self.prompted)

    @property
    def prompted(self) -> list[dict]:
        """The rows the engine is asked about (its size, where it needs one up front): eval's problems,
        every other command's rows and held-out rows."""
        return self.held_out if isinstance(self.cfg, EvalRoot) else self.rows + self.held_out

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.closing.close()


@dataclass
class TrainRun(Run):
    """A training run: the optimizer and its schedule, where batches come from (``source``: the prompt
    order included) and the ones generated ahead, the step guard, the held-out evaluations so far.
    ``resume.trainer_state`` is what a checkpoint adds to the weights."""

    path: Path = field(default_factory=Path)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    source: BatchSource | None = None
    guard: StepGuard | None = None
    config_yaml: str = ""
    # rollout.max_staleness >= 1: the rollouts generated while the policy trains.
    ahead: RolloutsAhead | None = None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    # Where held-out generation shows its progress (the console's live panel on rank 0).
    progress: GenerationProgress = field(default_factory=GenerationProgress)
    # The checkpoint's trainer state when the run resumed, else None.
    state: dict[str, Any] | None = None

    @property
    def order(self) -> PromptOrder:
        return self.source.order

    def held_out_metrics(self) -> dict[str, float]:
        return held_out_metrics(
            self.sampler, self.rewarder, self.held_out, self.cfg.train, self.cfg.seed, self.progress
        )

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
            saved = checkpoint.Saved(
                self.policy.model, self.policy.tokenizer, state, self.config_yaml, model_state
            )
            try:
                path = checkpoint.save(self.path, step, saved, self.cfg.train.keep_checkpoints)
            except checkpoint.SaveFailed as exc:
                path = exc  # every rank stops with it (``commands.train``), not only this one
        path = distributed.broadcast_object(path)
        if isinstance(path, checkpoint.SaveFailed):
            raise path
        return path


def _sized(cfg: Any) -> bool:
    """Whether the engine needs the run's longest prompt up front (vllm without rollout.max_model_len)."""
    return cfg.rollout.engine == "vllm" and not cfg.rollout.max_model_len


def _samples_per_prompt(cfg: Any) -> int:
    """Completions the engine draws from one prompt: G, or eval's n."""
    return cfg.eval.samples if isinstance(cfg, EvalRoot) else cfg.algo.group_size


def _engine(cfg: Any, policy: Policy, rows: list[dict], owner: str = "") -> Engine:
    """The engine ``rollout.engine`` names over ``policy``, sized (vllm) for the longest of ``rows``.
    ``owner`` (vllm-server): the training run's directory, whose weight group the servers then belong to
    (empty for sample and eval, one-off clients that a training run's servers refuse)."""
    longest = 0
    if _sized(cfg):
        longest = longest_prompt(policy.tokenizer, rows, PromptFormat.of(cfg.data, cfg.model))
        longest += extra_tokens(cfg.env, cfg.rollout)  # an episode's budget beyond max_new_tokens
    return build_engine(policy, cfg.rollout, cfg.model, cfg.seed, longest, _samples_per_prompt(cfg), owner)


def _eval_policy(cfg: Any, name: str) -> Policy:
    checkpoint_dir = None if name == "base" else name
    return load_policy(cfg.model, cfg.lora, beta=0.0, checkpoint=checkpoint_dir, trainable=False)


def _command_rows(cfg: SampleRoot | EvalRoot) -> tuple[list[dict], list[dict]]:
    """(rows, held-out rows) of ``grpo sample`` and ``grpo eval``."""
    if isinstance(cfg, EvalRoot):
        rows = load_rows(cfg.data, cfg.eval.split)  # never empty (ConfigError)
        return rows, rows[: cfg.eval.problems]
    return load_rows(cfg.data, cfg.sample.split)[: cfg.sample.prompts], []


def build_run(cfg: SampleRoot | EvalRoot, checkpoint_name: str = "base") -> Run:
    """The run of ``grpo sample`` or ``grpo eval`` (its first checkpoint ``checkpoint_name``)."""
    rng.seed_everything(cfg.seed)
    rows, held_out = _command_rows(cfg)
    closing = ExitStack()
    try:
        # Before any model loads: a judge or scoring service that does not answer is one line at start.
        rewarder = closing.enter_context(build_rewarder(cfg.reward))
        if isinstance(cfg, EvalRoot):
            policy = _eval_policy(cfg, checkpoint_name)
        else:
            policy = load_policy(cfg.model, cfg.lora, beta=0.0, trainable=False)
        spec = episode_spec(cfg.env, policy, cfg.rollout)  # the command's one environment
        closing.callback(spec.close)
        fmt = PromptFormat.of(cfg.data, cfg.model)
        run = Run(cfg, rows, held_out, policy, spec, fmt, None, None, closing)
        run.engine = _engine(cfg, policy, run.prompted)
        closing.callback(lambda: run.engine.close())  # the engine of the checkpoint loaded last
        run.rewarder = rewarder
        return run
    except BaseException:
        closing.close()
        raise


def _init_world(cfg: TrainRoot) -> distributed.World:
    """Join the process group; every rank must get whole groups of an equal share of the prompts."""
    world = distributed.init()
    tr = cfg.train
    if tr.prompts_per_step % world.size:
        raise ConfigError(
            f"train.prompts_per_step={tr.prompts_per_step}: must divide by the {world.size} ranks "
            "(each rank samples whole groups of an equal share)"
        )
    return world


def _train_policy(cfg: TrainRoot, world: distributed.World, resume_from: Path | None) -> Policy:
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


def build_train_run(cfg: TrainRoot, run_path: Path) -> TrainRun:
    """The run of ``grpo train``: load data, policy, engine, optimizer; restore the checkpoint
    ``train.resume`` finds (``run.state`` is its trainer state, None for a new run)."""
    tr = cfg.train
    if cfg.algo.max_completion_length is None:  # Dr. GRPO's constant: the longest episode we sample
        cfg.algo.max_completion_length = episode_budget(cfg.env, cfg.rollout)
    world = _init_world(cfg)
    rng.seed_everything(cfg.seed)  # the same on every rank: LoRA's initial weights must agree
    rows = load_rows(cfg.data, cfg.data.train_split)
    held_out = load_rows(cfg.data, cfg.data.test_split)[: tr.eval_problems]
    resume_from = resume.find_resume(tr, run_path)
    closing = ExitStack()
    try:
        # Before any model loads: a judge or scoring service that does not answer is one line at start.
        rewarder = closing.enter_context(build_rewarder(cfg.reward))
        policy = _train_policy(cfg, world, resume_from)
        # The run's one environment (its markers checked against the tokenizer before any engine starts).
        spec = episode_spec(cfg.env, policy, cfg.rollout)
        closing.callback(spec.close)
        # Per-rank streams from here (dropout); rollouts have their own per-prompt streams (batch.draw_seed).
        rng.seed_everything(cfg.seed + world.rank)
        optimizer, scheduler = make_optimizer(policy, tr)
        if warning := low_precision_warning(trained_params(optimizer), tr.lr):
            log.warning(warning)
        fmt = PromptFormat.of(cfg.data, cfg.model)
        # After the weights are final (a resume's included): the engine starts with them (vllm: pushed).
        engine = _engine(cfg, policy, rows + held_out, str(run_path))
        closing.callback(engine.close)
        config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        run = TrainRun(
            cfg, rows, held_out, policy, spec, fmt, engine, rewarder, closing, path=run_path,
            optimizer=optimizer, scheduler=scheduler, guard=StepGuard(tr.max_bad_steps, tr.zero_std_warn),
            config_yaml=config_yaml,
        )  # fmt: skip
        order = PromptOrder(len(rows), cfg.seed)
        run.source = BatchSource(run.sampler, rewarder, rows, order, cfg.algo, cfg.seed, tr.prompts_per_step)
        if cfg.rollout.max_staleness:
            run.ahead = RolloutsAhead(run.source, cfg.rollout.max_staleness)
            closing.callback(run.ahead.close)  # first to close: its thread uses the rest
        if resume_from is not None:
            run.state = checkpoint.load_state(resume_from)
            resume.restore(run, run.state)
            resume.warn_config_changes(resume_from, config_yaml)
            log.info("resumed from %s at step %d", resume_from, run.state["step"])
        return run
    except BaseException:
        closing.close()
        raise
