"""The `grpo` command: dispatch, Hydra flags after the subcommand, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_cli.config import conf_dir


def grpo(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "grpo_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def test_no_arguments_lists_the_subcommands():
    out = grpo()
    assert out.returncode == 0
    assert all(cmd in out.stdout for cmd in ("train", "sample", "eval", "export"))


def test_unknown_subcommand_exits_2_with_usage():
    out = grpo("fly")
    assert out.returncode == 2 and "usage: grpo" in out.stderr and "fly" in out.stderr


def test_cfg_job_prints_the_paper_defaults():
    out = grpo("train", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "group_size: 8" in out.stdout and "epsilon: 0.2" in out.stdout and "beta: 0.04" in out.stdout


@pytest.mark.parametrize("command", ["train", "sample", "eval", "export"])
def test_command_help_names_the_command_its_groups_and_where_to_read_more(command):
    out = grpo(command, "data=humaneval", "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"grpo {command}: ") and f"usage: grpo {command} " in text
    for group in ("algo", "data", "lora", "model", "reward"):
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        assert f"\n{group}: {', '.join(options)}\n" in text
    assert "schema" not in text and "hydra/" not in text and "powered by Hydra" not in text
    assert "data=humaneval reward=code" in text  # the choices of this command line
    assert f"grpo {command} --cfg job" in text and "README" in text


@pytest.mark.parametrize(
    "override,needle",
    [
        ("algo.beta=abc", "algo.beta"),
        ("algo.group_size=1", "algo.group_size"),
        ("algo.epsilon=0", "algo.epsilon"),
        ("train.prompts_per_step=0", "train.prompts_per_step"),
        ("model=nope", "choose one of"),
        ("algo.nope=1", "nope"),
        ("model.name_or_path=/no/such/dir", "no such directory"),
        ("model.name_or_path=nobody/not-cached-model", "local"),
    ],
)
def test_bad_values_are_one_line_exit_2(override, needle):
    out = grpo("train", override)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and "Traceback" not in out.stderr


def test_unknown_group_option_lists_the_choices():
    out = grpo("train", "model=nope")
    options = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    assert all(o in out.stderr for o in options)


@pytest.mark.slow
def test_multirun_sweep_writes_one_run_per_value(tmp_path, random_model_dir):
    out = grpo(
        "train",
        "-m",
        "algo.beta=0,0.04",
        f"model.name_or_path={random_model_dir}",
        "lora=none",
        "train.steps=1",
        "train.prompts_per_step=2",
        "algo.group_size=2",
        "train.eval_problems=2",
        "train.eval_samples=1",
        "rollout.max_new_tokens=3",
        "console=plain",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.jsonl"))
    assert len(runs) == 2
    betas = []
    for metrics in runs:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        cfg_text = (metrics.parent / ".hydra" / "config.yaml").read_text()
        betas.append(next(line.split(":")[1].strip() for line in cfg_text.splitlines() if "beta:" in line))
    assert sorted(betas) == ["0.0", "0.04"]
