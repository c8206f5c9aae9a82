"""Rollouts that overlap training (rollout.max_staleness >= 1) on two local `grpo serve` servers of
the tiny model: the lag bound holds with a slow reward, a run killed at random moments and resumed
equals the uninterrupted one, and the off-policy correction sees stale samples. Slow (servers start
once per session, ~1 minute; each run a few seconds); skipped without vLLM."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import rule_module, start_servers, stop_servers
from helpers import metric_rows, run_train

from grpo_cli import engines

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not engines.vllm_available(), reason="vLLM not installed (make install-vllm)"),
    pytest.mark.usefixtures("one_thread"),
]

REPO = Path(__file__).resolve().parents[3]
REWARDS_MODULE = '''
import time, zlib
def slow_noisy(completions, rows):
    """0, 1/3, 2/3 or 1 by a checksum of the text, after 0.3 s: scoring is slower than the update."""
    time.sleep(0.3)
    return [(zlib.crc32(c.encode()) % 4) / 3 for c in completions]
'''


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory):
    with rule_module(tmp_path_factory.mktemp("rewards"), "grpo_async_rewards", REWARDS_MODULE) as path:
        yield path


def _base(urls, rewards_dir) -> list[str]:
    return [
        "rollout.engine=vllm-server", "rollout.servers=[" + ",".join(urls) + "]", "lora=none",
        "reward.rules=[{name:slow_noisy,_target_:grpo_async_rewards.slow_noisy,weight:1.0}]",
        "train.prompts_per_step=4", "algo.group_size=4", "rollout.max_new_tokens=6", "train.lr=1e-2",
        "train.eval_every=0", "train.eval_at_ends=false", "algo.engine_is.cap=2.0", "console=plain",
    ]  # fmt: skip


@pytest.mark.parametrize("staleness", [1, 2])
def test_no_trained_sample_lags_more_than_the_bound(tiny_servers, rewards_dir, tmp_path, staleness):
    """With a reward slower than the update, every step's batch lags exactly min(step - 1, S)
    versions, and the engine/trainer log-prob difference shows the lag (on-policy it is ~1e-6)."""
    run_train(
        [*_base(tiny_servers, rewards_dir), "train.steps=6", f"rollout.max_staleness={staleness}"], tmp_path
    )
    rows = metric_rows(tmp_path)
    for step in range(1, 7):
        assert rows[step]["staleness"] == min(step - 1, staleness), (step, rows[step])
        assert rows[step]["dropped_groups"] == 0
    assert rows[1]["rollout/logprob_diff"] < 1e-4  # step 1 is on-policy
    assert min(rows[s]["rollout/logprob_diff"] for s in range(staleness + 2, 7)) > 1e-3


def _cli(args, rewards_dir) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(rewards_dir), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "grpo_cli", "train", *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _steps(run_dir: Path) -> int:
    """The last step in metrics.jsonl (0: none yet)."""
    path = run_dir / "metrics.jsonl"
    return max(metric_rows(run_dir)) if path.exists() and path.read_text().strip() else 0


def test_killed_at_random_moments_and_resumed_equals_the_uninterrupted_run(
    tiny_servers, rewards_dir, tmp_path
):
    """S = 1: SIGKILL at random moments (mid-generation, mid-update, mid-sync, mid-save), then
    train.resume=auto until done: every step's metrics equal the uninterrupted run's, which needs
    the pending batch (ids, log-probs, version) restored from the checkpoint."""
    base = [
        *_base(tiny_servers, rewards_dir),
        "rollout.max_staleness=1",
        "train.steps=8",
        "train.save_every=1",
    ]
    run_train(base, tmp_path / "straight")
    ref = metric_rows(tmp_path / "straight")
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(8):
        proc = _cli([*base, f"hydra.run.dir={run_dir}", "train.resume=auto"], rewards_dir)
        if kills < 3:
            # Past a step this attempt logged, then a random moment of the steps that follow.
            logged = _steps(run_dir)
            deadline = time.monotonic() + 240
            while _steps(run_dir) <= logged and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                proc.kill()
                kills += 1
        if proc.wait(300) == 0 and kills == 3:
            break
    assert kills == 3
    got = metric_rows(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == ref[step], step
    assert {got[s]["staleness"] for s in got if s > 1} == {1.0}


def test_a_server_that_dies_mid_run_stops_it_with_the_resume_command(tmp_path, rewards_dir):
    """SIGKILL the (only) server after step 2: the run stops with exit 75 and one error naming the
    URL and the resume command; the checkpoints written before it are whole and resumable."""

    from grpo_cli.run import checkpoint

    urls, procs = start_servers(["tiny"], tmp_path)
    try:
        run_dir = tmp_path / "run"
        args = [*_base(urls, rewards_dir), "train.steps=30", "train.save_every=1", "rollout.sync_timeout=20",
                f"hydra.run.dir={run_dir}"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(rewards_dir), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "grpo_cli", "train", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + 240
        while _steps(run_dir) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_servers(procs, signal.SIGKILL)  # the server and its engine, as when its machine dies
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_servers(procs)
    assert proc.returncode == 75, out
    errors = [line for line in out.splitlines() if "generation server failed" in line]
    assert len(errors) == 1 and urls[0] in errors[0], out
    assert "train.resume=auto" in out
    last = checkpoint.list_checkpoints(run_dir)[-1]
    assert checkpoint.resolve_resume("auto", run_dir) == last
