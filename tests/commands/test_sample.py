"""`grpo sample`: the table and samples.jsonl carry advantages equal to core.advantages.group_advantages,
and each record its row's reference answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from grpo_cli.cli import compose_config
from grpo_cli.core.advantages import group_advantages
from grpo_cli.data import load_rows


def test_sample_advantages_match_group_advantages(tmp_path, random_model_dir):
    # A custom rule whose scores vary within a group, so the advantages are not all zero.
    (tmp_path / "varied_reward.py").write_text(
        "def by_length(completions, rows):\n    return [float(len(c) % 3) for c in completions]\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_cli",
            "sample",
            f"model.name_or_path={random_model_dir}",
            "sample.prompts=3",
            "algo.group_size=6",
            "rollout.max_new_tokens=6",
            f"hydra.run.dir={tmp_path}",
            "reward.rules=[{name:len,_target_:varied_reward.by_length,weight:1.0}]",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "advantage" in out.stdout and "group mean" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 6
    rewards = torch.tensor([r["reward"] for r in records], dtype=torch.float32)
    expected = group_advantages(rewards, 6)
    got = torch.tensor([r["advantage"] for r in records])
    assert expected.abs().sum() > 0, "the rule should give varied rewards"
    torch.testing.assert_close(got, expected)
    assert [r["prompt_index"] for r in records] == [i // 6 for i in range(18)]
    cfg, _ = compose_config("sample", [f"model.name_or_path={random_model_dir}"])
    rows = load_rows(cfg.data, cfg.sample.split)  # sample.prompts takes the split's first rows
    assert [r["reference"] for r in records] == [rows[i // 6]["answer"] for i in range(18)]
    assert all(r["id"] == rows[i // 6]["id"] for i, r in enumerate(records))
