"""What a checkpoint adds to the weights, and continuing a run from one (``train.resume``).

A resumed run continues the RNG streams, the prompt order and the counters where the checkpoint left
them, so its metric rows equal an uninterrupted run's (exactly on CPU; on GPU up to the
non-determinism of CUDA kernels unless ``torch.use_deterministic_algorithms`` is on).
``checkpoint`` writes and lists the files; this module decides what goes into ``trainer_state.pt``
and how a run takes it back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from grpo_cli.config import ConfigError, TrainConfig
from grpo_cli.run import checkpoint
from grpo_cli.runtime import distributed, rng

log = logging.getLogger("grpo_cli")

# Settings a resumed run may change without its metrics departing from the uninterrupted run's.
RESUME_FREE_KEYS = tuple(
    "train.steps train.resume train.save_every train.keep_checkpoints train.logger train.log_completions_every "
    "train.max_bad_steps train.zero_std_warn console".split()
)


def optimizer_format(policy: Any) -> str:
    """How the optimizer state is saved: gathered from the FSDP shards, or torch's own state dict."""
    return "fsdp_full" if policy.lockstep else "torch"


def trainer_state(t: Any, optimizer_state: dict | None = None) -> dict[str, Any]:
    """The run's state besides the weights; ``t`` is the run (``commands.build.TrainRun``)."""
    return {
        "optimizer": optimizer_state if optimizer_state is not None else t.optimizer.state_dict(),
        "optimizer_format": optimizer_format(t.policy),
        "scheduler": t.scheduler.state_dict(),
        "prompt_order": t.order.state_dict(),
        "guard": t.guard.state_dict(),
        "evals": t.evals,
        # Every rank's RNG (dropout draws differ per rank); rank r resumes with rng_ranks[r].
        "rng_ranks": distributed.gather_objects(rng.rng_state()),
        # rollout.max_staleness >= 1: each rank's batches generated ahead, not yet trained on.
        "ahead_ranks": distributed.gather_objects(t.ahead.state_dict() if t.ahead is not None else []),
    }


def restore(t: Any, state: dict[str, Any]) -> None:
    """Load ``trainer_state`` into the run ``t``; ConfigError when the optimizer state's format differs."""
    saved = state.get("optimizer_format", "torch")
    if saved != optimizer_format(t.policy):
        raise ConfigError(
            f"the checkpoint's optimizer state was saved with train.strategy="
            f"{'fsdp' if saved == 'fsdp_full' else 'ddp (or 1 process)'}: resume it the same way"
        )
    distributed.load_optimizer_state(t.policy.wrapper, t.optimizer, state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    # "sampler": the key's name in checkpoints written before it was renamed.
    t.order.load_state_dict(state["prompt_order"] if "prompt_order" in state else state["sampler"])
    t.guard.load_state_dict(state.get("guard", {}))
    t.evals = dict(state.get("evals", {}))
    _restore_ahead(t, state.get("ahead_ranks") or [])


def _restore_ahead(t: Any, ranks: list[list[dict[str, Any]]]) -> None:
    """The batches generated ahead, each rank its own; none when the run does not generate ahead."""
    world = distributed.world()
    if t.ahead is None:
        if any(ranks) and world.is_main:
            log.warning("the checkpoint holds batches generated ahead; rollout.max_staleness=0 drops them")
        return
    if len(ranks) != world.size:
        if any(ranks) and world.is_main:
            log.warning(
                "the checkpoint was written by another number of ranks: its pending batches are dropped"
            )
        return
    t.ahead.load_state_dict(ranks[world.rank])


def find_resume(tr: TrainConfig, run_path: Path) -> Path | None:
    """The checkpoint ``train.resume`` names, or None; ConfigError rather than overwrite a run's checkpoints.

    Rank 0 verifies the checkpoint (``checkpoint.resolve_resume``) and tells the other ranks.
    """
    found: Path | ConfigError | None = None
    if distributed.world().is_main:
        try:
            found = checkpoint.resolve_resume(tr.resume, run_path)
        except ConfigError as exc:
            found = exc  # every rank stops with it, not only this one
    resume_from = distributed.broadcast_object(found)
    if isinstance(resume_from, ConfigError):
        raise resume_from
    existing = checkpoint.list_checkpoints(run_path)
    if resume_from is None and existing and not tr.resume:
        # Starting over would truncate this run's metrics and overwrite its checkpoints.
        raise ConfigError(
            f"{run_path} already holds {existing[-1].name}: continue it with train.resume=auto, "
            "or give the new run another hydra.run.dir"
        )
    if resume_from is None and tr.resume == "auto":
        log.info("no checkpoint in %s yet: starting from step 0", run_path)
    return resume_from


def warn_config_changes(resume_from: Path, config_yaml: str) -> None:
    """Warn when the resumed run's settings differ from the checkpoint's (beyond ``RESUME_FREE_KEYS``)."""
    saved = resume_from / "config.yaml"
    old_yaml = saved.read_text() if saved.is_file() else ""
    free = RESUME_FREE_KEYS
    if _lr_decays(config_yaml):  # train.steps is the decay's horizon: changing it changes every lr after
        free = tuple(k for k in free if k != "train.steps")
    changes = checkpoint.config_changes(old_yaml, config_yaml, free) if old_yaml else []
    if changes:
        log.warning(
            "resuming with changed settings (metrics will differ from an uninterrupted run): %s",
            "; ".join(changes),
        )


def _lr_decays(config_yaml: str) -> bool:
    from omegaconf import OmegaConf

    train = OmegaConf.create(config_yaml).get("train") or {}
    return train.get("lr_schedule", "constant") != "constant"


def rank_rng(state: dict[str, Any], world: distributed.World) -> dict[str, Any]:
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
