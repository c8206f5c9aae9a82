"""`grpo sample` and `grpo eval` on data=reasoning_gym, offline, through the real command line: the
rewards they report are the task's own score_answer of what the model (or a file) answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DATA = ["data=reasoning_gym", "data.task=chain_sum", "data.task_config={max_terms: 3, max_digits: 1}"]


def grpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_sample_scores_with_the_tasks_own_score_answer(tmp_path, random_model_dir):
    rg = pytest.importorskip("reasoning_gym")
    from grpo_cli.cli import compose_config
    from grpo_cli.data import load_rows
    from grpo_cli.rewards.reasoning_gym import ReasoningGymReward

    out = grpo(
        "sample",
        *DATA,
        f"model.name_or_path={random_model_dir}",
        "sample.prompts=2",
        "algo.group_size=4",
        "rollout.max_new_tokens=4",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8
    cfg, _ = compose_config("sample", DATA)
    rows = {r["id"]: r for r in load_rows(cfg.data, "test")}
    extract = ReasoningGymReward(workers=1).answer_of
    for rec in records:
        row = rows[rec["id"]]
        own = rg.create_dataset("chain_sum", **row["task_config"]).score_answer(
            extract(rec["completion"]), row["entry"]
        )
        assert rec["reward/reasoning_gym"] == own


def test_eval_of_completions_from_a_file(tmp_path):
    pytest.importorskip("reasoning_gym")
    from grpo_cli.cli import compose_config
    from grpo_cli.data import load_rows

    cfg, _ = compose_config("eval", DATA)
    rows = load_rows(cfg.data, "test")[:4]
    # Problem 0: both right; 1: one right, one tagged and right; 2: both wrong; 3: partial credit only.
    lines = [
        (0, r0 := rows[0]["answer"]),
        (0, r0),
        (1, rows[1]["answer"]),
        (1, f"<answer>{rows[1]['answer']}</answer>"),
    ]
    lines += [(2, "x"), (2, "x"), (3, f"= {rows[3]['answer']}"), (3, f"= {rows[3]['answer']}")]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"id": rows[i]["id"], "completion": c}) + "\n" for i, c in lines))
    out = grpo(
        "eval",
        *DATA,
        f"eval.completions={path}",
        "eval.samples=2",
        "eval.k=[1,2]",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval.json").read_text())["results"][0]["metrics"]
    assert metrics["pass@1"] == pytest.approx(2 / 4)  # 1 + 1 + 0 + 0 over 4 problems
    assert metrics["pass@2"] == pytest.approx(2 / 4)
    partial = len(rows[3]["answer"]) / len(f"= {rows[3]['answer']}")
    assert metrics["mean_reward"] == pytest.approx((1 + 1 + 1 + 1 + 0 + 0 + partial + partial) / 8)


@pytest.mark.slow
def test_curriculum_stages_resume_with_the_next_level(tmp_path, random_model_dir, caplog):
    # docs/data.md's staged schedule: level 0 for 2 steps, then resume at level 2 up to step 4.
    pytest.importorskip("reasoning_gym")
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train
    from grpo_cli.run.runlog import read_metrics

    base = [
        *DATA[:2], f"model.name_or_path={random_model_dir}", "train.prompts_per_step=2", "algo.group_size=2",
        "rollout.max_new_tokens=3", "train.eval_every=0", "data.train_size=50", "data.test_size=4", "console=plain",
        "train.save_every=2",
    ]  # fmt: skip
    cfg, _ = compose_config("train", [*base, "data.difficulty=0", "train.steps=2"])
    train.run(cfg, str(tmp_path))
    cfg, _ = compose_config("train", [*base, "data.difficulty=2", "train.steps=4", "train.resume=auto"])
    train.run(cfg, str(tmp_path))
    assert "data.difficulty" in caplog.text  # the resume names the changed setting
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoint-4").is_dir()
