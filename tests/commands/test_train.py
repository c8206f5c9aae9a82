"""Training runs that survive: exact resume, kills mid-save, Ctrl-C, NaN guards, dynamic sampling, curves.

Every run is a random 2-layer Qwen2 (``random_model_dir``) on CPU with 2 prompts x 4 completions of 4
tokens per step, scored by a test-local reward rule (``_target_: grpo_test_rewards.<rule>``) that
gives completions of the same prompt different rewards, so the updates and the sampled completions,
hence the metrics, depend on the weights, the optimizer state, the RNG and the prompt order.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import rule_module
from helpers import metric_rows, model_weights, run_train

from grpo_cli.cli import compose_config
from grpo_cli.commands import train
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.run import checkpoint, guards
from grpo_cli.run.runlog import read_metrics

# tiny models on a shared machine: OpenMP threads only wait on each other (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
INJECT = (
    Path(__file__).resolve().parents[1] / "inject"
)  # sitecustomize: GRPO_TEST_SAVE_DELAY for subprocesses

REWARDS_MODULE = '''
import json, os, zlib

def noisy(completions, rows):
    """0, 1/3, 2/3 or 1 by a checksum of the text: varies within a group, the same in every process."""
    return [(zlib.crc32(c.encode()) % 4) / 3 for c in completions]

def half_constant(completions, rows):
    """0.5 for every completion of a prompt with an even id (a zero-variance group), else 0 or 1."""
    scores = [0.5 if int(r["id"]) % 2 == 0 else float(zlib.crc32(c.encode()) % 2) for c, r in zip(completions, rows)]
    with open(os.environ["GRPO_TEST_REWARD_LOG"], "a") as f:  # every call, so a test can recount
        f.write(json.dumps(scores) + "\\n")
    return scores
'''


def _rule(name: str) -> str:
    return f"reward.rules=[{{name:{name},_target_:grpo_test_rewards.{name},weight:1.0}}]"


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory):
    """A directory holding the test's reward rules, on sys.path here and on PYTHONPATH for subprocesses."""
    with rule_module(tmp_path_factory.mktemp("rewards"), "grpo_test_rewards", REWARDS_MODULE) as path:
        yield path


@pytest.fixture(scope="module")
def base(random_model_dir, rewards_dir) -> list[str]:
    return [
        f"model.name_or_path={random_model_dir}", "lora=none", _rule("noisy"), "train.prompts_per_step=2",
        "algo.group_size=4", "rollout.max_new_tokens=4", "train.eval_problems=4", "train.eval_samples=2",
        "data.train_size=64", "data.test_size=8", "train.lr=1e-2", "console=plain",
    ]  # fmt: skip


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> Path:
    """6 steps without interruption: the reference the interrupted runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_train([*base, "train.steps=6"], run_dir)
    return run_dir


def test_resume_reproduces_the_uninterrupted_run(base, straight, tmp_path):
    run_train([*base, "train.steps=3"], tmp_path)
    run_train([*base, "train.steps=6", "train.resume=auto"], tmp_path)
    ref, got = metric_rows(straight), metric_rows(tmp_path)
    assert sorted(got) == list(range(7))
    for step in (4, 5, 6):
        assert got[step] == ref[step], step
    _assert_same_weights(straight / "checkpoint-6", tmp_path / "checkpoint-6")
    # The comparison means something: rewards vary and the weights moved between steps 3 and 6.
    assert len({ref[s]["reward"] for s in range(1, 7)}) > 1
    w3, w6 = model_weights(tmp_path / "checkpoint-3"), model_weights(tmp_path / "checkpoint-6")
    assert any(not torch.equal(w3[k], w6[k]) for k in w3)


def test_resume_with_a_lora_adapter_reproduces_the_uninterrupted_run(base, tmp_path):
    lora = [*base, "lora=default", "lora.r=4", "train.eval_every=0"]
    run_train([*lora, "train.steps=3"], tmp_path / "straight")
    run_train([*lora, "train.steps=2"], tmp_path / "resumed")
    run_train([*lora, "train.steps=3", "train.resume=auto"], tmp_path / "resumed")
    assert metric_rows(tmp_path / "resumed")[3] == metric_rows(tmp_path / "straight")[3]
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / d / "checkpoint-3" / "adapter_model.safetensors")
        for d in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(args: list[str], rewards_dir: Path, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(rewards_dir), str(INJECT), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "grpo_cli", "train", *args], cwd=REPO, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before the test could act:\n{proc.stdout.read()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def _has_step(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and f'"step": {step},' in path.read_text()


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(base, straight, rewards_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*base, "train.steps=4", "train.save_every=2", f"hydra.run.dir={run_dir}"]
    proc = _cli(args, rewards_dir, GRPO_TEST_SAVE_DELAY="3")
    _wait_for(lambda: (run_dir / "checkpoint-2").is_dir() and any(run_dir.glob(".tmp-checkpoint-4-*")), proc)
    proc.kill()  # SIGKILL while checkpoint-4 sits in its temporary directory
    proc.wait(30)
    proc.stdout.close()
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not (run_dir / "checkpoint-4").exists()
    assert checkpoint.load_state(run_dir / "checkpoint-2")["step"] == 2

    run_train([*base, "train.steps=4", "train.resume=auto"], run_dir)
    assert not list(run_dir.glob(".tmp-checkpoint-*")), (
        "the killed save's temporary directory was not removed"
    )
    got, ref = metric_rows(run_dir), metric_rows(straight)
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert got[3] == ref[3]
    assert {k: v for k, v in got[4].items() if not k.startswith("eval/")} == ref[4]


@pytest.mark.slow
def test_sigint_saves_prints_the_resume_command_and_resume_finishes_the_run(
    base, straight, rewards_dir, tmp_path
):
    run_dir = tmp_path / "run"
    # A checkpoint every step, each held back 0.3 s: the run cannot finish before the signal lands.
    args = [*base, "train.steps=6", "train.save_every=1", f"hydra.run.dir={run_dir}"]
    proc = _cli(args, rewards_dir, GRPO_TEST_SAVE_DELAY="0.3")
    _wait_for(lambda: _has_step(run_dir, 1), proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    stopped_at = max(metric_rows(run_dir))
    assert 1 <= stopped_at < 6, out
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)][-1] == f"checkpoint-{stopped_at}"
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("grpo train ")]
    assert commands, out
    command = shlex.split(commands[-1])
    assert command[-2:] == [f"hydra.run.dir={run_dir}", "train.resume=auto"] and args[:-1] == command[2:-2]

    # Run the printed command as a user would (``grpo`` is ``python -m grpo_cli`` here).
    resumed = _cli(command[2:], rewards_dir)
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    got, ref = metric_rows(run_dir), metric_rows(straight)
    assert sorted(got) == list(range(7))
    for step in range(stopped_at + 1, 7):
        assert got[step] == ref[step], step
    _assert_same_weights(straight / "checkpoint-6", run_dir / "checkpoint-6")


@pytest.fixture
def nan_steps(monkeypatch):
    """``nan_steps({3, 4})`` multiplies the loss of those steps by NaN (the guard's input); ``set()`` stops it."""
    from grpo_cli.commands import update

    steps: set[int] = set()
    current = {"step": 0}
    real_step, real_loss = train.train_step, update.policy_loss

    def step_and_note(*args, **kwargs):
        current["step"] += 1  # these runs start at step 1
        return real_step(*args, **kwargs)

    def poisoned_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan") if current["step"] in steps else loss), stats

    monkeypatch.setattr(train, "train_step", step_and_note)
    monkeypatch.setattr(update, "policy_loss", poisoned_loss)

    def set_steps(chosen: set[int]) -> None:
        steps.clear()
        steps.update(chosen)

    return set_steps


def test_a_nan_loss_is_skipped_and_counted(base, tmp_path, nan_steps):
    nan_steps({2})
    run_train([*base, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=0"], tmp_path)
    rows = metric_rows(tmp_path)
    assert [rows[s]["skipped"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert [rows[s]["bad_steps"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert rows[2]["loss"] is None  # NaN is written as null
    # No checkpoint of a skipped step; AdamW took 2 steps (1 and 3), not 3.
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3"]
    adam = checkpoint.load_state(tmp_path / "checkpoint-3")["optimizer"]["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}
    assert all(torch.isfinite(w).all() for w in model_weights(tmp_path / "checkpoint-3").values())


def test_repeated_nans_stop_the_run_and_keep_the_last_good_checkpoint(base, tmp_path, nan_steps, caplog):
    nan_steps({3, 4, 5, 6})
    with pytest.raises(SystemExit) as stopped, caplog.at_level("WARNING", logger="grpo_cli"):
        run_train([*base, "train.steps=8", "train.save_every=1", "train.max_bad_steps=3"], tmp_path)
    assert stopped.value.code == 1
    assert "stopped: 3 steps in a row had a non-finite loss or gradient" in caplog.text
    assert "train.resume=auto" in caplog.text
    assert max(metric_rows(tmp_path)) == 5
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert checkpoint.load_state(tmp_path / "checkpoint-2")["step"] == 2
    assert all(torch.isfinite(w).all() for w in model_weights(tmp_path / "checkpoint-2").values())
    # Once the cause is fixed, the run continues from that checkpoint (train.resume=PATH).
    nan_steps(set())
    run_train([*base, "train.steps=3", f"train.resume={tmp_path / 'checkpoint-2'}"], tmp_path)
    rows = metric_rows(tmp_path)
    assert sorted(rows) == [0, 1, 2, 3] and rows[3]["skipped"] == 0.0 and rows[3]["bad_steps"] == 0.0


def _groups(scores: list[float], size: int) -> list[list[float]]:
    return [scores[i : i + size] for i in range(0, len(scores), size)]


def test_dynamic_sampling_fills_the_batch_with_informative_groups(base, tmp_path, monkeypatch):
    log_path = tmp_path / "reward_calls.jsonl"
    monkeypatch.setenv("GRPO_TEST_REWARD_LOG", str(log_path))
    overrides = [*base, _rule("half_constant"), "train.steps=3", "algo.dynamic_sampling=true",
                 "algo.max_sampling_rounds=8", "train.log_completions_every=1", "train.eval_problems=3"]  # fmt: skip
    run_train(overrides, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] > 0]
    # Training rounds score 2 x 4 completions; evaluation calls score 3 x 2 and 3 x 1.
    rounds = [json.loads(line) for line in log_path.read_text().splitlines() if len(json.loads(line)) == 8]
    assert sum(r["sampling_rounds"] for r in rows) == len(rounds)
    assert any(r["sampling_rounds"] > 1 for r in rows), "the test should make at least one step resample"
    completions = [
        json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    ]
    for row in rows:
        sampled = [g for _ in range(int(row["sampling_rounds"])) for g in _groups(rounds.pop(0), 4)]
        flat = [len(set(g)) == 1 for g in sampled]
        assert row["zero_std_frac"] == pytest.approx(sum(flat) / len(flat))  # what was sampled, all rounds
        assert sum(not f for f in flat) >= 2  # the cap (8 rounds) was not needed: the batch could be filled
        trained = _groups([c["reward"] for c in completions if c["step"] == row["step"]], 4)
        assert len(trained) == 2 and all(len(set(g)) > 1 for g in trained), trained
        assert row["batch_zero_std_frac"] == 0.0


def test_zero_variance_warning_waits_then_repeats_rarely():
    guard = guards.StepGuard(max_bad_steps=5, zero_std_warn=0.9)
    warned = [s for s in range(1, 120) if guard.record(s, {"skipped": 0.0, "zero_std_frac": 1.0})]
    first = guards.ZERO_STD_PATIENCE
    assert warned == [first, first + guards.ZERO_STD_REPEAT, first + 2 * guards.ZERO_STD_REPEAT]
    assert not guard.record(200, {"skipped": 0.0, "zero_std_frac": 0.5})  # a good step resets the streak


@pytest.mark.parametrize(
    "override,key",
    [("train.logger=[jsonl,neptune]", "train.logger"), ("algo.overlong_buffer=99", "algo.overlong_buffer"),
     ("algo.max_sampling_rounds=0", "algo.max_sampling_rounds"), ("train.max_bad_steps=0", "train.max_bad_steps"),
     ("train.zero_std_warn=1.5", "train.zero_std_warn")],
)  # fmt: skip
def test_bad_robustness_settings_are_one_line_errors(override, key):
    cfg, _ = compose_config("train", [override])
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_curves_png_has_the_named_panels(straight):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (grpo-cli[plots])")
    from PIL import Image

    from grpo_cli.run.plots import PANELS

    path = straight / "curves.png"
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200
        img.load()
        described = img.text["Description"]
    for panel in ("reward", "accuracy", "kl", "clip fraction", "completion length", "step time (s)"):
        assert panel in PANELS and panel in described


def test_a_fresh_start_in_a_run_dir_with_checkpoints_is_refused(base, straight):
    before = (straight / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="train.resume=auto"):
        run_train([*base, "train.steps=6"], straight)
    assert (straight / "metrics.jsonl").read_text() == before


def test_completions_are_logged_with_rewards_advantages_and_overlong_penalty(base, tmp_path):
    # max_new_tokens=4 with a buffer of 2: 2 tokens are free, 3 cost 0.25, 4 (cut off) cost the full 0.5.
    overrides = [*base, "train.steps=2", "train.log_completions_every=2", "algo.overlong_buffer=2",
                 "algo.overlong_penalty=0.5"]  # fmt: skip
    run_train(overrides, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 8
    assert set(rows[0]) == {
        "step",
        "prompt",
        "completion",
        "reference",
        "length",
        "reward",
        "rewards",
        "advantage",
    }
    assert rows[0]["prompt"].startswith("Calculate ")
    # each completion's reference is its row's answer: the answer of the problem its prompt poses
    cfg, _ = compose_config("train", base)
    answers = {build_prompt(row, cfg.data.template): row["answer"] for row in load_rows(cfg.data, "train")}
    assert all(r["reference"] == answers[r["prompt"]] for r in rows)
    for r in rows:
        penalty = 0.5 * max(0, r["length"] - 2) / 2
        assert r["reward"] == pytest.approx(r["rewards"]["noisy"] - penalty)
    group = rows[:4]
    mean = sum(r["reward"] for r in group) / 4
    std = math.sqrt(sum((r["reward"] - mean) ** 2 for r in group) / 3)
    for r in group:  # A_i = (r_i - mean) / (std + 1e-4), the group's unbiased std
        assert r["advantage"] == pytest.approx((r["reward"] - mean) / (std + 1e-4), abs=1e-5)
    assert "reward/overlong_penalty" in read_metrics(tmp_path)[-1]


@pytest.mark.parametrize("lora", [False, True])
def test_full_finetuning_of_bf16_weights_warns_that_small_updates_are_lost(base, tmp_path, caplog, lora):
    """model.dtype=bfloat16: full fine-tuning says once, at the start, that AdamW's steps round away;
    LoRA (float32 adapters) trains without the warning. Both take a finite step."""
    overrides = [*base, "model.dtype=bfloat16", "train.steps=1", "train.eval_problems=0"]
    overrides += ["lora=default", "lora.r=4"] if lora else []
    with caplog.at_level("WARNING", logger="grpo_cli"):
        run_train(overrides, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "rounds that away" in r.getMessage()]
    if lora:
        assert warned == []
    else:  # train.lr=1e-2 in `base`: 4 * 1e-2 / 2^-7
        assert warned == ["full fine-tuning updates bfloat16 weights in place: AdamW moves a weight by about "
                          "train.lr=0.01 per step, and bfloat16 rounds that away for every weight larger than "
                          "5.1; use LoRA (float32 adapters) or model.dtype=float32 "
                          "(docs/configuration.md#bfloat16)"]  # fmt: skip
    (row,) = [r for r in read_metrics(tmp_path) if r["step"] == 1]
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["skipped"] == 0.0


def test_mini_batches_with_a_cosine_schedule_resume_exactly_after_a_crash(base, tmp_path, monkeypatch):
    """algo.steps_per_generation=2 (one group per optimizer step) and a cosine decay: a run that dies
    after step 5's update (checkpoints every 2 steps) and is resumed with train.resume=auto logs every
    step's metrics, lr included, equal to the uninterrupted run's, and ends on the same weights."""
    args = [
        *base, "train.steps=6", "train.save_every=2", "train.eval_every=0", "algo.steps_per_generation=2",
        "train.lr_schedule=cosine", "train.min_lr_ratio=0.1", "train.warmup_steps=1",
    ]  # fmt: skip
    run_train(args, tmp_path / "straight")
    real = train._log_step

    def dies_at_step_5(t, logger, step, *rest):
        if step == 5:
            raise RuntimeError("killed")
        return real(t, logger, step, *rest)

    monkeypatch.setattr(train, "_log_step", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        run_train(args, tmp_path / "resumed")
    monkeypatch.setattr(train, "_log_step", real)
    assert checkpoint.list_checkpoints(tmp_path / "resumed")[-1].name == "checkpoint-4"
    run_train([*args, "train.resume=auto"], tmp_path / "resumed")
    ref, got = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 7)) and got == ref
    _assert_same_weights(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    # What was compared moves: the lr decays every step after warm-up, the second mini-batch's ratios
    # leave 1, and rewards vary.
    lrs = [ref[s]["lr"] for s in range(1, 7)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-2 * 0.1)
    assert all(ref[s]["ratio/max"] > 1.0 or ref[s]["ratio/min"] < 1.0 for s in range(1, 7))
    assert len({ref[s]["reward"] for s in range(1, 7)}) > 1
