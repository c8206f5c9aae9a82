"""What a checkpoint adds to the weights and how a run takes it back, on a fake trainer.

The end-to-end resume (metrics equal to an uninterrupted run) is in tests/test_train.py; here each
piece of ``resume`` on its own: the trainer state round trip, which checkpoint a run continues
from, the changed-settings warning and the per-rank RNG.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from grpo_cli.config import ConfigError
from grpo_cli.rollout.batch import PromptOrder
from grpo_cli.run.checkpoint import STATE_FILE, load_state
from grpo_cli.run.guards import StepGuard
from grpo_cli.run.resume import find_resume, rank_rng, restore, trainer_state, warn_config_changes
from grpo_cli.runtime.distributed import World


def _trainer(lockstep: bool = False) -> SimpleNamespace:
    """What ``trainer_state`` and ``restore`` read of ``commands.train.Trainer``: a real AdamW, warm-up
    schedule, prompt order and guard around one small parameter."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return SimpleNamespace(
        weight=weight,
        optimizer=optimizer,
        scheduler=scheduler,
        order=PromptOrder(num_rows=10, seed=3),
        guard=StepGuard(max_bad_steps=5, zero_std_warn=0.9),
        evals={},
        policy=SimpleNamespace(lockstep=lockstep, wrapper=None),
        ahead=None,  # rollout.max_staleness=0: no batches generated ahead
    )


def _advance(t: SimpleNamespace, steps: int) -> None:
    """``steps`` training steps' worth of state: optimizer moments, schedule, prompts, guard, evals."""
    for step in range(1, steps + 1):
        t.weight.grad = torch.tensor([1.0, -2.0, 0.5]) * step
        t.optimizer.step()
        t.scheduler.step()
        t.order.take(4)
        t.guard.record(
            step, {"skipped": float(step == 2), "loss": 0.0, "grad_norm": 0.0, "zero_std_frac": 1.0}
        )
    t.evals[steps] = {"accuracy": 0.25}


def _checkpoint(run, step: int):
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    torch.save({}, path / STATE_FILE)  # a checkpoint saved before manifests: its files are not verified
    return path


# ---------------------------------------------------------------------------- trainer_state, restore


def test_restored_run_continues_exactly_where_the_saved_one_was(tmp_path):
    saved = _trainer()
    _advance(saved, 3)
    # through the file, as checkpoint.save writes it (a state dict in memory shares Adam's moments)
    torch.save(trainer_state(saved), tmp_path / STATE_FILE)
    state = load_state(tmp_path)
    assert state["optimizer_format"] == "torch"
    assert state["rng_ranks"] == [state["rng_ranks"][0]] and set(state["rng_ranks"][0]) >= {"python", "torch"}

    fresh = _trainer()
    fresh.weight.data.copy_(saved.weight.data)  # the weights travel separately (checkpoint.save)
    restore(fresh, state)
    assert fresh.scheduler.last_epoch == 3 and fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert fresh.order.state_dict() == {"epoch": 1, "pos": 2}  # 12 of 10 prompts drawn
    assert fresh.guard.state_dict() == saved.guard.state_dict() == {
        "bad_total": 1, "bad_streak": 0, "zero_streak": 3, "last_zero_warning": -(10**9),
    }  # fmt: skip
    assert fresh.evals == {3: {"accuracy": 0.25}} and fresh.evals is not saved.evals
    # one more step on each: the same prompts and the same weights (Adam's moments came back)
    _advance(saved, 1)
    _advance(fresh, 1)
    assert saved.order.take(5) == fresh.order.take(5)
    assert torch.equal(saved.weight, fresh.weight)
    assert fresh.optimizer.state[fresh.weight]["step"].item() == 4


def test_fsdp_saves_the_gathered_optimizer_state_it_is_given_and_says_so():
    t = _trainer(lockstep=True)
    gathered = {"state": {}, "param_groups": [{"lr": 0.1, "params": ["weight"]}]}
    state = trainer_state(t, gathered)
    assert state["optimizer"] is gathered and state["optimizer_format"] == "fsdp_full"


def test_restore_refuses_an_optimizer_state_of_the_other_strategy():
    ddp_state = trainer_state(_trainer(lockstep=False))
    with pytest.raises(ConfigError, match=r"train.strategy=ddp \(or 1 process\): resume it the same way"):
        restore(_trainer(lockstep=True), ddp_state)
    fsdp_state = {**ddp_state, "optimizer_format": "fsdp_full"}
    with pytest.raises(ConfigError, match="train.strategy=fsdp: resume it the same way"):
        restore(_trainer(lockstep=False), fsdp_state)


def test_a_checkpoint_without_format_guard_or_evals_restores_as_a_single_process_one():
    saved = _trainer()
    _advance(saved, 2)
    old = {k: v for k, v in trainer_state(saved).items() if k not in ("optimizer_format", "guard", "evals")}
    fresh = _trainer()
    fresh.evals = {7: {"accuracy": 1.0}}
    restore(fresh, old)
    assert fresh.scheduler.last_epoch == 2
    assert fresh.guard.state_dict() == StepGuard(5, 0.9).state_dict()  # left as a new run's
    assert fresh.evals == {}


# ---------------------------------------------------------------------------- find_resume


def test_find_resume_in_an_empty_run_dir(tmp_path, caplog):
    assert find_resume(SimpleNamespace(resume=None), tmp_path) is None
    with caplog.at_level(logging.INFO, logger="grpo_cli"):
        assert find_resume(SimpleNamespace(resume="auto"), tmp_path) is None
    assert "no checkpoint in" in caplog.text and "starting from step 0" in caplog.text


def test_find_resume_takes_the_newest_checkpoint_or_the_named_one(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 10)
    (tmp_path / "checkpoint-12").mkdir()  # no state file: a save that never finished
    assert find_resume(SimpleNamespace(resume="auto"), tmp_path) == newest
    other = _checkpoint(tmp_path / "elsewhere", 4)
    assert find_resume(SimpleNamespace(resume=str(other)), tmp_path) == other


@pytest.mark.parametrize("resume", [None, ""])
def test_a_fresh_start_over_a_runs_checkpoints_is_refused_naming_the_newest(tmp_path, resume):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    with pytest.raises(ConfigError, match="already holds checkpoint-10: continue it with train.resume=auto"):
        find_resume(SimpleNamespace(resume=resume), tmp_path)


# ---------------------------------------------------------------------------- warn_config_changes

OLD_YAML = "train:\n  steps: 3\n  lr: 0.1\n  save_every: 1\nalgo:\n  beta: 0.04\n  group_size: 8\n"


def test_changed_settings_are_warned_about_but_resume_free_ones_are_not(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path, 3)
    (ckpt / "config.yaml").write_text(OLD_YAML)
    new = OLD_YAML.replace("steps: 3", "steps: 6").replace("save_every: 1", "save_every: 2")
    new = new.replace("beta: 0.04", "beta: 0.0").replace("lr: 0.1", "lr: 0.2")
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        warn_config_changes(ckpt, new)
    [record] = caplog.records
    assert "resuming with changed settings" in record.message
    assert "algo.beta: 0.04 -> 0.0" in record.message and "train.lr: 0.1 -> 0.2" in record.message
    assert "train.steps" not in record.message and "train.save_every" not in record.message


def test_no_warning_for_the_same_settings_or_a_checkpoint_without_its_config(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path, 3)
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        warn_config_changes(ckpt, OLD_YAML)  # no config.yaml in the checkpoint: nothing to compare
        (ckpt / "config.yaml").write_text(OLD_YAML)
        warn_config_changes(ckpt, OLD_YAML.replace("steps: 3", "steps: 9"))  # a free key only
    assert caplog.records == []


# ---------------------------------------------------------------------------- rank_rng


def _states(n: int) -> list[dict]:
    """Stand-ins for ``checkpoint.rng_state()`` of n ranks: rank_rng only picks one."""
    return [{"python": f"rank {r}", "torch": torch.full((2,), r)} for r in range(n)]


def test_each_rank_takes_its_own_rng_state():
    states = _states(3)
    for rank in range(3):
        assert rank_rng({"rng_ranks": states}, World(rank=rank, size=3)) is states[rank]


def test_another_world_size_takes_rank_0s_state_and_says_so_once(caplog):
    states = _states(2)
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        assert rank_rng({"rng_ranks": states}, World(rank=0, size=4)) is states[0]
        assert rank_rng({"rng_ranks": states}, World(rank=3, size=4)) is states[0]
        assert rank_rng({"rng_ranks": states}, World(rank=0, size=1)) is states[0]
    said = [r.message for r in caplog.records]
    assert len(said) == 2  # rank 0 of each run, not rank 3
    assert "written by 2 ranks, this run has 4" in said[0] and "this run has 1" in said[1]


def test_a_single_rng_checkpoint_serves_every_rank():
    [state] = _states(1)
    assert rank_rng({"rng": state}, World()) is state
    assert rank_rng({"rng": state, "rng_ranks": None}, World(rank=1, size=2)) is state


def test_a_decaying_schedule_warns_when_train_steps_changes(tmp_path, caplog):
    """train.steps is free to change on resume, except under a decay: it sets the decay's horizon."""
    ckpt = _checkpoint(tmp_path, 3)
    decaying = OLD_YAML.replace("steps: 3\n", "steps: 3\n  lr_schedule: cosine\n")
    (ckpt / "config.yaml").write_text(decaying)
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        warn_config_changes(ckpt, decaying.replace("steps: 3", "steps: 9"))
    [record] = caplog.records
    assert "train.steps: 3 -> 9" in record.message
