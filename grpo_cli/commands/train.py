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
from pathlib import Path
from typing import Any

import torch

from grpo_cli.commands.build import TrainRun, build_train_run
from grpo_cli.commands.heldout import held_out_due
from grpo_cli.commands.step import train_step
from grpo_cli.config import TrainRoot
from grpo_cli.data import build_prompt, reference
from grpo_cli.engines.server.http import SERVER_FAILED_EXIT, ServerError
from grpo_cli.rollout.record import Rollout, transcript
from grpo_cli.run import checkpoint, resume
from grpo_cli.run.guards import RunStopped, stop_message, stop_reason
from grpo_cli.run.progress import LONG_GENERATION_TOKENS, GenerationProgress, cost_line
from grpo_cli.run.runlog import RunLogger, SilentLogger
from grpo_cli.runtime import distributed, rng
from grpo_cli.runtime.logs import setup_logging

log = logging.getLogger("grpo_cli")


def completion_records(
    step: int, ro: Rollout, advantages: torch.Tensor, template: str, tokenizer: Any = None
) -> list[dict[str, Any]]:
    """One ``completions.jsonl`` row per completion of the trained rollout: ``completion`` is the
    model's own words (what the rules judged), ``reference`` what they judged it against
    (``data.reference``); episodes with a tool add ``transcript``, every token
    after the prompt decoded, the tool's included (given ``tokenizer``)."""
    return [
        {
            "step": step,
            "prompt": build_prompt(ro.rows[i], template),
            "completion": ro.texts[i],
            "reference": reference(ro.rows[i]),
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


def _loop(t: TrainRun, logger: Any, stop: checkpoint.GracefulStop, start: int, resume_cmd: str) -> None:
    """Steps ``start + 1 .. train.steps``; raises RunStopped after a signal or too many bad steps."""
    tr = t.cfg.train
    for step in range(start + 1, tr.steps + 1):
        metrics, ro, advantages = train_step(t, step)
        if held_out_due(step, tr):
            t.evals[step] = t.held_out_metrics()
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
    t: TrainRun, logger: Any, step: int, metrics: dict[str, float], ro: Rollout, advantages: torch.Tensor
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
    resume_cmd = checkpoint.resume_command(run_path, overrides, launcher=distributed.launcher())
    with build_train_run(cfg, run_path) as t:
        start = t.state["step"] if t.state else 0
        resumed, tr = t.state is not None, cfg.train
        logger = (
            RunLogger(run_path, tr.steps, start, cfg.console, tr.logger, resumed, t.config_yaml)
            if world.is_main
            else SilentLogger()
        )
        t.closing.callback(logger.close)  # first to close: the run's last lines are written
        # The held-out evaluation's cost said up front, its progress shown.
        if world.is_main:
            t.progress = GenerationProgress(logger.console, live=logger.panel is not None)
            _announce_held_out(cfg, len(t.held_out), start)
        _train(t, logger, start, resume_cmd)
    logger.print(_summary(t.evals))
    distributed.barrier()  # no rank leaves while another may still be saving
    return {"evals": t.evals, "run_dir": str(run_path)}


def _train(t: TrainRun, logger: Any, start: int, resume_cmd: str) -> None:
    """The held-out evaluation before the first step (or the RNG where the checkpoint left it), the
    loop, and every way it can stop early as one ``RunStopped`` with the resume command."""
    run_path, world = t.path, distributed.world()
    try:
        with checkpoint.GracefulStop() as stop:
            if t.state is None:
                if held_out_due(0, t.cfg.train):
                    t.evals[0] = t.held_out_metrics()
                    logger.log(0, t.evals[0])
            else:
                # Exactly where the checkpoint took it: the next draw is the one step start+1 made.
                rng.set_rng_state(resume.rank_rng(t.state, world))
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
