"""Checkpoint files: atomic save and rotation, resume resolution, RNG state, the resume command, signals."""

from __future__ import annotations

import os
import random
import shlex
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_cli.config import ConfigError
from grpo_cli.run import checkpoint, manifest
from grpo_cli.runtime import rng


class FakeModel:
    """Stands in for a transformers model / tokenizer: ``save_pretrained`` writes one file."""

    def __init__(self, text: str, fail: bool = False, name: str = "weights.txt"):
        self.text, self.fail, self.name = text, fail, name

    def save_pretrained(self, path: Path) -> None:
        (Path(path) / self.name).write_text(self.text)
        if self.fail:
            raise OSError("disk full")


def _save(run: Path, step: int, text: str = "weights", keep: int = 2, fail: bool = False) -> Path:
    model, tokenizer = FakeModel(text, fail), FakeModel("tok", name="tokenizer.txt")
    return checkpoint.save(
        run, step, checkpoint.Saved(model, tokenizer, {"prompt_order": {"pos": step}}, "a: 1\n"), keep
    )


def test_save_writes_everything_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    state = checkpoint.load_state(tmp_path / "checkpoint-4")
    assert state["step"] == 4 and state["prompt_order"] == {"pos": 4}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    # The config as given, after the line that says this checkpoint has a manifest (run.manifest).
    assert (tmp_path / "checkpoint-4" / "config.yaml").read_text() == manifest.MARK + "a: 1\n"
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_zero_keeps_every_checkpoint_and_order_is_numeric(tmp_path):
    for step in (9, 10, 2):
        _save(tmp_path, step, keep=0)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-9",
        "checkpoint-10",
    ]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_directory(tmp_path):
    _save(tmp_path, 1, text="good")
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, fail=True)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "checkpoint-2").exists() and not list(tmp_path.glob(".tmp-*"))
    assert (tmp_path / "checkpoint-1" / "weights.txt").read_text() == "good"


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 3, text="first")
    _save(tmp_path, 3, text="second")
    assert (tmp_path / "checkpoint-3" / "weights.txt").read_text() == "second"
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_directories_are_not_checkpoints_and_partial_saves_are_removed(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "checkpoint-5").mkdir()  # no trainer_state.pt: e.g. copied by hand, half-way
    (tmp_path / ".tmp-checkpoint-6-abc").mkdir()  # what a killed save leaves
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    removed = checkpoint.remove_partial(tmp_path)
    assert [p.name for p in removed] == [".tmp-checkpoint-6-abc"]
    assert (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "checkpoint-5").is_dir()


def test_resolve_resume(tmp_path):
    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-4"
    assert checkpoint.resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(ConfigError, match="train.resume=.*not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)


def test_rng_state_round_trip():
    state = rng.rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    rng.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == first


def test_resume_command_repeats_the_overrides_with_this_run_dir(tmp_path):
    overrides = [
        "model=qwen",
        "reward.rules=[{name: x, _target_: m.f}]",
        "train.resume=PATH",
        "hydra.run.dir=old",
    ]
    command = checkpoint.resume_command(tmp_path, overrides)
    assert shlex.split(command) == [
        "grpo", "train", "model=qwen", "reward.rules=[{name: x, _target_: m.f}]",
        f"hydra.run.dir={tmp_path.resolve()}", "train.resume=auto",
    ]  # fmt: skip
    # Outside a Hydra run there are no recorded overrides.
    assert checkpoint.resume_command(tmp_path).startswith("grpo train hydra.run.dir=")


def test_config_changes_lists_changed_leaves():
    old = "train:\n  steps: 3\n  lr: 0.1\nalgo:\n  beta: 0.04\n"
    new = "train:\n  steps: 6\n  lr: 0.1\nalgo:\n  beta: 0.0\n"
    assert checkpoint.config_changes(old, new, ignore=["train.steps"]) == ["algo.beta: 0.04 -> 0.0"]


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the Python-level handler runs at the next bytecode boundary
        time.sleep(0.001)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_is_remembered_second_interrupts(sig, code, capfd):
    before = signal.getsignal(sig)
    with checkpoint.GracefulStop() as stop:
        assert not stop.requested
        _deliver(sig)
        assert stop.requested and stop.exit_code == code
        with pytest.raises(KeyboardInterrupt):
            _deliver(sig)
    assert signal.getsignal(sig) is before
    assert "finishing this step, then saving a checkpoint" in capfd.readouterr().err


def test_pruning_keeps_the_one_just_written_even_below_a_higher_step(tmp_path):
    """A run resumed from checkpoint-2 while checkpoint-6 exists writes checkpoint-3: with keep=1 the
    new one stays (the old rule, highest steps first, would have removed it)."""
    for step in (2, 6):
        _save(tmp_path, step, keep=0)
    _save(tmp_path, 3, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3"]
    _save(tmp_path, 4, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_damaged_checkpoints_are_not_counted_among_those_kept(tmp_path):
    """keep=2 with the newest older checkpoint damaged: the new one and the newest whole one are kept,
    the damaged one is left where it is (not counted, not removed)."""
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=0)
    weights = tmp_path / "checkpoint-3" / "weights.txt"
    weights.write_text("bitrot")  # same size, other bytes: its manifest no longer matches
    _save(tmp_path, 4, keep=2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert not manifest.verify(tmp_path / "checkpoint-3").whole
    assert manifest.verify(tmp_path / "checkpoint-2").whole
