"""scripts/demo_rm.py: its runs are valid configs whose only trained reward is the reward model, and its
table reads the first and last held-out evaluation of each run from metrics.jsonl."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import load_script

from grpo_cli.cli import compose_config
from grpo_cli.commands.validate import validate

demo_rm = load_script("demo_rm")


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_run_trains_on_the_reward_model_alone(beta):
    args = demo_rm.parse_args([])
    cfg, _ = compose_config("train", demo_rm.train_args(beta, 1, args))
    validate(cfg)
    assert cfg.algo.beta == beta and cfg.seed == 1 and cfg.train.steps == args.steps
    weights = {r["name"]: r["weight"] for r in cfg.reward.rules}
    assert weights == {"math": 0.0, "model": 1.0}  # the truth is logged, never trained on
    assert cfg.reward.rules[0]["name"] == "math"  # first: the rule behind eval/accuracy


def test_the_table_reads_first_and_last_evaluations(tmp_path, monkeypatch):
    args = argparse.Namespace(steps=4, eval_every=2, problems=3)
    for seed, (last_rm, last_acc) in enumerate([(0.9, 0.1), (0.7, 0.3)]):
        run = tmp_path / f"beta0-seed{seed}"
        (run / "checkpoint-4").mkdir(parents=True)  # present: the script reads, it does not train
        rows = [
            {"step": 0, "eval/reward": 0.5, "eval/accuracy": 0.25, "eval/accuracy_greedy": 0.6},
            *({"step": s, "reward": 0.1 * s, "completion_len": 3.0 + s} for s in range(1, 4)),
            {
                "step": 4,
                "completion_len": 7.0,
                "eval/reward": last_rm,
                "eval/accuracy": last_acc,
                "eval/accuracy_greedy": 0.0,
            },  # fmt: skip
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {0.0: {s: demo_rm.run_one(0.0, s, args, tmp_path) for s in (0, 1)}}
    assert results[0.0][0]["step"] == [0, 4] and results[0.0][1]["eval/accuracy"] == [0.25, 0.3]
    assert results[0.0][0]["completion_len"] == [pytest.approx(5.5)]  # mean of the last ten batches
    table = demo_rm.table(results)
    assert "| 0 | 4 | 0.500 (0.50..0.50) | 0.250 (0.25..0.25) |" in table
    assert "0.800 (0.70..0.90) | 0.200 (0.10..0.30)" in table
