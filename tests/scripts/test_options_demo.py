"""scripts/options_demo.py: every option's overrides are a valid config, and the table reads the first
and last held-out evaluation from metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.commands.validate import validate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "options_demo.py"
spec = importlib.util.spec_from_file_location("options_demo", SCRIPT)
options_demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(options_demo)


@pytest.mark.parametrize("name", list(options_demo.OPTIONS))
def test_each_options_overrides_compose_and_validate(name):
    cfg, _ = compose_config("train", options_demo.OPTIONS[name])
    validate(cfg)


def test_the_table_reads_the_first_and_last_evaluation_and_the_train_rewards(tmp_path):
    rows = [
        {"step": 0, "eval/accuracy": 0.25, "eval/accuracy_greedy": 0.5},
        *({"step": s, "reward": s / 10} for s in range(1, 4)),
        {"step": 3, "eval/accuracy": 0.75, "eval/accuracy_greedy": 0.625},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals, rewards = options_demo._evals(path)
    assert [e["eval/accuracy"] for e in evals] == [0.25, 0.75]
    assert rewards == [0.1, 0.2, 0.3]
