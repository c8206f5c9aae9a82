"""Runs that meet a damaged checkpoint, on the checkpoints of a real run (a random 2-layer Qwen2, full
fine-tuning, CPU): resume falls back past it and equals the uninterrupted run, ``grpo eval`` refuses it
in one line (exit 2) before sampling, an old checkpoint without a manifest still loads, and a save that
runs out of disk half-way stops the run (exit 74) with the checkpoints before it whole.

Each step's rewards come from a test-local rule that varies within a group (a checksum of the text), so
the metrics depend on the weights, the optimizer state, the RNG and the prompt order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import rule_module
from helpers import full_disk, metric_rows, model_weights, run_train

from grpo_cli.cli import compose_config
from grpo_cli.commands import build
from grpo_cli.commands import eval as evaluate
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError
from grpo_cli.run import checkpoint, manifest
from grpo_cli.run.resume import find_resume

# tiny models on a shared machine: OpenMP threads only wait on each other (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
REWARDS = """
import zlib

def noisy(completions, rows):
    return [(zlib.crc32(c.encode()) % 4) / 3 for c in completions]
"""


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory) -> Path:
    """Holds the test's reward rule: on sys.path here, on PYTHONPATH for subprocesses."""
    with rule_module(tmp_path_factory.mktemp("rewards"), "grpo_damage_rewards", REWARDS) as path:
        yield path


@pytest.fixture(scope="module")
def base(random_model_dir, rewards_dir) -> list[str]:
    return [
        f"model.name_or_path={random_model_dir}", "lora=none", "train.prompts_per_step=2", "algo.group_size=4",
        "reward.rules=[{name:noisy,_target_:grpo_damage_rewards.noisy,weight:1.0}]", "rollout.max_new_tokens=4",
        "train.eval_problems=4", "train.eval_samples=2", "data.train_size=64", "data.test_size=8",
        "train.lr=1e-2", "console=plain", "train.save_every=2", "train.keep_checkpoints=0",
    ]  # fmt: skip


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = model_weights(a), model_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> Path:
    """6 steps without interruption, checkpoints 2, 4 and 6: the reference, and the checkpoints to damage."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_train([*base, "train.steps=6"], run_dir)
    return run_dir


def _stopped_at_4(straight: Path, run_dir: Path) -> Path:
    """``run_dir`` as the straight run left it after step 4: checkpoints 2 and 4, metric rows 0-4."""
    run_dir.mkdir()
    for step in (2, 4):
        shutil.copytree(straight / f"checkpoint-{step}", run_dir / f"checkpoint-{step}")
    rows = [
        line
        for line in (straight / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= 4
    ]
    (run_dir / "metrics.jsonl").write_text("".join(f"{line}\n" for line in rows))
    return run_dir


def _eval_cfg(random_model_dir: Path, tmp_path: Path, *overrides: str):
    cfg, _ = compose_config(
        "eval",
        [f"model.name_or_path={random_model_dir}", "lora=none", "eval.problems=2", "eval.samples=2",
         "rollout.max_new_tokens=4", "console=plain", f"eval.out={tmp_path / 'eval.json'}", *overrides],
    )  # fmt: skip
    return cfg


# ---------------------------------------------------------------------------- resume


def test_resume_past_a_truncated_checkpoint_reproduces_the_uninterrupted_run(
    base, straight, tmp_path, caplog
):
    run_dir = _stopped_at_4(straight, tmp_path / "run")
    weights = run_dir / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # what a full disk or an interrupted copy leaves
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        run_train([*base, "train.steps=6", "train.resume=auto"], run_dir)
    [passed] = [m for m in caplog.messages if "passing over" in m]
    assert passed.startswith(
        "train.resume=auto: passing over checkpoint-4: model.safetensors: size (1,000 bytes"
    )
    got, ref = metric_rows(run_dir), metric_rows(straight)
    assert sorted(got) == list(range(7))
    for step in range(3, 7):  # from checkpoint-2 on, as if nothing had happened
        assert got[step] == ref[step], step
    assert _same_weights(straight / "checkpoint-6", run_dir / "checkpoint-6")
    assert manifest.verify(run_dir / "checkpoint-4").whole  # written again by the resumed run
    assert len({ref[s]["reward"] for s in range(1, 7)}) > 1  # the comparison can fail: rewards vary


DAMAGES = {
    "truncate": (lambda b: b[: len(b) // 2], "size"),
    "delete": (None, "missing"),
    "flip": (lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1 :], "checksum"),
}


def _damage_each_file(run_dir: Path, older: Path, newest: Path, eval_cfg: Any) -> list[str]:
    """Truncate, delete, flip a byte of each file of ``newest`` in turn (undone after each): resume=auto
    falls back to ``older`` naming the file and why, resume=PATH and eval refuse in one line. Returns the
    files. The caller makes eval's model loading fail: eval must refuse before it."""
    names = sorted(p.name for p in newest.iterdir())
    for damage, (change, reason) in DAMAGES.items():
        for name in names:
            want = "unreadable" if name == manifest.MANIFEST and damage != "delete" else reason
            original = (newest / name).read_bytes()
            if change is None:
                (newest / name).unlink()
            else:
                (newest / name).write_bytes(change(original))
            with _warnings() as said:
                assert find_resume(SimpleNamespace(resume="auto"), run_dir) == older, (damage, name)
            assert said == [f"train.resume=auto: passing over {newest.name}: {name}: {want} ("], (
                damage,
                said,
            )
            with pytest.raises(ConfigError, match=f"not a complete checkpoint: {name}: {want} "):
                find_resume(SimpleNamespace(resume=str(newest)), run_dir)
            with pytest.raises(ConfigError) as refused:
                validate(eval_cfg)
                evaluate.run(eval_cfg, str(run_dir))
            assert f"{newest}: not a whole checkpoint: {name}: {want} (" in str(refused.value), (
                damage,
                refused.value,
            )
            assert "\n" not in str(refused.value)
            (newest / name).write_bytes(original)
    assert manifest.verify(newest).whole and not list(run_dir.glob("eval*.json*"))
    return names


@contextmanager
def _warnings():
    """The grpo_cli warnings logged inside the block, each cut after its first "(" (the detail)."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage().split("(")[0] + "(")
    logger = logging.getLogger("grpo_cli")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def test_every_file_of_a_real_checkpoint_damaged_in_turn_is_named_by_resume_and_eval(
    straight, random_model_dir, tmp_path, monkeypatch
):
    run_dir = _stopped_at_4(straight, tmp_path / "run")
    monkeypatch.setattr(build, "load_policy", lambda *a, **k: pytest.fail("eval loaded a damaged checkpoint"))
    newest = run_dir / "checkpoint-4"
    cfg = _eval_cfg(random_model_dir, tmp_path, f"checkpoint={newest}")
    names = _damage_each_file(run_dir, run_dir / "checkpoint-2", newest, cfg)
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "config.yaml",
            "manifest.json"} <= set(names)  # fmt: skip


def test_every_file_of_a_lora_checkpoint_damaged_in_turn_is_named_by_resume_and_eval(
    base, random_model_dir, tmp_path, monkeypatch
):
    run_dir = tmp_path / "lora"
    run_train(
        [*base, "lora=default", "lora.r=4", "train.eval_every=0", "train.steps=2", "train.save_every=1"],
        run_dir,
    )
    monkeypatch.setattr(build, "load_policy", lambda *a, **k: pytest.fail("eval loaded a damaged checkpoint"))
    newest = run_dir / "checkpoint-2"
    cfg = _eval_cfg(random_model_dir, tmp_path, f"checkpoint={newest}", "lora=default")
    names = _damage_each_file(run_dir, run_dir / "checkpoint-1", newest, cfg)
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json", "trainer_state.pt"} <= set(
        names
    )


def test_grpo_eval_of_a_damaged_checkpoint_is_one_line_and_exit_2(straight, random_model_dir, tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(straight / "checkpoint-4", ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [
        f"checkpoint={ckpt}",
        f"model.name_or_path={random_model_dir}",
        "lora=none",
        f"hydra.run.dir={tmp_path}",
    ]
    out = subprocess.run([sys.executable, "-m", "grpo_cli", "eval", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"grpo eval: error: {ckpt}: not a whole checkpoint: model.safetensors: size (1,000 bytes, "
                     f"the manifest says {(straight / 'checkpoint-4' / 'model.safetensors').stat().st_size:,})"]  # fmt: skip
    assert not (tmp_path / "eval.json").exists()


def test_grpo_train_resume_path_to_a_damaged_checkpoint_is_one_line_and_exit_2(
    base, straight, rewards_dir, tmp_path
):
    run_dir = _stopped_at_4(straight, tmp_path / "run")
    state = run_dir / "checkpoint-4" / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    before = (run_dir / "metrics.jsonl").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(rewards_dir), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    args = [*base, "train.steps=6", f"train.resume={run_dir / 'checkpoint-4'}", f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "-m", "grpo_cli", "train", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"grpo train: error: train.resume={run_dir / 'checkpoint-4'}: not a complete checkpoint: "
                     f"trainer_state.pt: size (1,000 bytes, the manifest says {_size(straight)})"]  # fmt: skip
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing written


def _size(straight: Path) -> str:
    return f"{(straight / 'checkpoint-4' / checkpoint.STATE_FILE).stat().st_size:,}"


def test_eval_of_a_list_evaluates_the_whole_ones_and_marks_the_damaged_one(
    straight, random_model_dir, tmp_path, caplog, capsys
):
    good, bad = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"
    for ckpt in (good, bad):
        shutil.copytree(straight / ckpt.name, ckpt)
    (bad / "config.json").unlink()
    cfg = _eval_cfg(random_model_dir, tmp_path, f"eval.checkpoints=[{good},{bad}]")
    validate(cfg)
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        results = evaluate.run(cfg, str(tmp_path))["results"]
    assert [r["checkpoint"] for r in results] == [str(good), str(bad)]
    assert results[0]["n"] == 2 and "pass@1" in results[0]["metrics"]
    assert results[1] == {"checkpoint": str(bad), "damaged": "not a whole checkpoint: config.json: missing "
                          "(the manifest lists it)", "n": 0, "metrics": {}, "ci95": {}}  # fmt: skip
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == results
    assert f"{bad}: not a whole checkpoint: config.json: missing" in caplog.text
    out = capsys.readouterr().out
    assert "damaged" in out and "checkpoint-4: not a whole checkpoint: config.json: missing" in out


def test_an_old_checkpoint_without_a_manifest_resumes_with_one_line(base, straight, tmp_path, caplog):
    run_dir = _stopped_at_4(straight, tmp_path / "run")
    for step in (2, 4):  # as saved before this change: no manifest, no mark in config.yaml
        ckpt = run_dir / f"checkpoint-{step}"
        (ckpt / manifest.MANIFEST).unlink()
        (ckpt / "config.yaml").write_text((ckpt / "config.yaml").read_text().removeprefix(manifest.MARK))
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        run_train([*base, "train.steps=6", "train.resume=auto"], run_dir)
    said = [m for m in caplog.messages if "cannot be verified" in m]
    assert said == [f"{run_dir / 'checkpoint-4'} has no manifest.json (saved before checkpoints had one, or "
                    "made elsewhere): its files cannot be verified"]  # fmt: skip
    got, ref = metric_rows(run_dir), metric_rows(straight)
    assert got[5] == ref[5] and got[6] == ref[6]
    assert manifest.verify(run_dir / "checkpoint-6").verified  # new checkpoints get their manifest


# ---------------------------------------------------------------------------- a save that fails


def test_a_full_disk_mid_save_stops_the_run_and_resume_equals_the_uninterrupted_run(
    base, straight, tmp_path, monkeypatch, caplog
):
    run_dir = tmp_path / "run"
    size = (straight / "checkpoint-4" / checkpoint.STATE_FILE).stat().st_size
    full_disk(monkeypatch, checkpoint.STATE_FILE, lambda: size // 2, nth=2)  # the save of step 4, half-way
    with caplog.at_level(logging.ERROR, logger="grpo_cli"), pytest.raises(SystemExit) as stopped:
        run_train([*base, "train.steps=6"], run_dir)
    assert stopped.value.code == checkpoint.SAVE_FAILED_EXIT == 74
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    reason, *resume_lines = record.getMessage().splitlines()
    assert reason == (
        "step 4: checkpoint-4 could not be saved (trainer_state.pt: [Errno 28] No space left on device); the "
        f"checkpoints saved before it are untouched; last checkpoint: {run_dir.resolve() / 'checkpoint-2'}"
    )
    assert resume_lines[0] == "resume with:" and resume_lines[1].strip().endswith("train.resume=auto")
    assert [p.name for p in checkpoint.checkpoint_dirs(run_dir)] == ["checkpoint-2"]
    assert not list(run_dir.glob(".tmp-*"))
    assert manifest.verify(run_dir / "checkpoint-2", need=[checkpoint.STATE_FILE]).whole
    assert _same_weights(straight / "checkpoint-2", run_dir / "checkpoint-2")
    assert max(metric_rows(run_dir)) == 4  # step 4 was logged before its save failed

    monkeypatch.undo()  # space freed
    run_train([*base, "train.steps=6", "train.resume=auto"], run_dir)
    got, ref = metric_rows(run_dir), metric_rows(straight)
    assert sorted(got) == list(range(7))  # rows 3 and 4 from the failed attempt were dropped, not kept twice
    for step in range(1, 7):
        assert got[step] == ref[step], step
    assert _same_weights(straight / "checkpoint-6", run_dir / "checkpoint-6")
