"""One environment per command, closed exactly once when the command ends, also when it fails.

A user environment (``env._target_``) counts its instances and its ``close()`` calls; ``grpo sample``,
``grpo train`` (finishing, and failing mid-run) and ``grpo eval`` over two checkpoints each build one.
"""

from __future__ import annotations

import sys

import pytest

from grpo_cli.cli import compose_config

ENV_FILE = """
from grpo_cli.envs import Observation

class Counted:
    built = 0
    closed = 0
    stop_strings = (" ",)

    def __init__(self, cfg):
        type(self).built += 1

    def reset(self, row, seed):
        return None

    def step(self, state, text):
        return Observation("ok")

    def close(self):
        type(self).closed += 1
"""


@pytest.fixture
def counted(tmp_path, monkeypatch):
    (tmp_path / "counted_env.py").write_text(ENV_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import counted_env

    yield counted_env.Counted
    sys.modules.pop("counted_env", None)


def _args(model_dir) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", "lora=none", "env._target_=counted_env.Counted",
        "rollout.max_new_tokens=8", "algo.group_size=2", "console=plain",
    ]  # fmt: skip


def test_sample_builds_one_environment_and_closes_it_once(counted, random_model_dir, tmp_path):
    from grpo_cli.commands import sample

    cfg, _ = compose_config("sample", [*_args(random_model_dir), "sample.prompts=2"])
    sample.run(cfg, str(tmp_path / "s"))
    assert (counted.built, counted.closed) == (1, 1)


def test_train_closes_its_environment_once_when_it_ends_and_when_it_fails(
    counted, random_model_dir, tmp_path, monkeypatch
):
    from grpo_cli.commands import train

    args = [*_args(random_model_dir), "train.steps=2", "train.prompts_per_step=2", "train.eval_problems=2"]
    cfg, _ = compose_config("train", args)
    train.run(cfg, str(tmp_path / "ok"), overrides=[])
    assert (counted.built, counted.closed) == (1, 1)  # held-out evaluations used the same one

    def broken_step(*a, **k):
        raise RuntimeError("a step fell over")

    monkeypatch.setattr(train, "train_step", broken_step)
    cfg, _ = compose_config("train", args)
    with pytest.raises(RuntimeError, match="fell over"):
        train.run(cfg, str(tmp_path / "failed"), overrides=[])
    assert (counted.built, counted.closed) == (2, 2)


def test_eval_uses_one_environment_for_every_checkpoint(counted, random_model_dir, tmp_path, monkeypatch):
    from grpo_cli.commands import eval as eval_cmd

    args = [*_args(random_model_dir), "eval.problems=2", "eval.samples=2", "eval.k=[1]", "eval.bootstrap=10"]
    cfg, _ = compose_config("eval", [*args, "eval.checkpoints=[base,base]"])
    eval_cmd.run(cfg, str(tmp_path / "e"), overrides=[])
    assert (counted.built, counted.closed) == (1, 1)
    records = (tmp_path / "e" / "eval_completions.jsonl").read_text().splitlines()
    assert len(records) == 2 * (2 * 2 + 2)  # two checkpoints x (2 problems x 2 samples + 2 greedy)

    def broken(*a, **k):
        raise RuntimeError("scoring fell over")

    monkeypatch.setattr(eval_cmd, "score_records", broken)
    cfg, _ = compose_config("eval", [*args, "eval.checkpoints=[base,base]"])
    with pytest.raises(RuntimeError, match="fell over"):
        eval_cmd.run(cfg, str(tmp_path / "e2"), overrides=[])
    assert (counted.built, counted.closed) == (2, 2)


def test_sample_and_eval_records_carry_the_token_ids_and_the_model_mask(counted, random_model_dir, tmp_path):
    """token_ids are the ids after the prompt, model_mask 1 where the model sampled them: the tool's
    "ok" answers are the zeros, and the model's ids alone decode to the record's ``completion``."""
    import json

    from grpo_cli.commands import eval as eval_cmd
    from grpo_cli.commands import sample
    from grpo_cli.models import load_tokenizer

    tok = load_tokenizer(str(random_model_dir))
    cfg, _ = compose_config(
        "sample",
        [*_args(random_model_dir), "sample.prompts=2", "rollout.max_new_tokens=32", "algo.group_size=4"],
    )
    rows = sample.run(cfg, str(tmp_path / "s"))
    assert rows == [json.loads(x) for x in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    ok_ids = tok("ok", add_special_tokens=False)["input_ids"]
    for r in rows:
        assert len(r["token_ids"]) == len(r["model_mask"]) and sum(r["model_mask"]) == r["tokens"]
        tool = [t for t, m in zip(r["token_ids"], r["model_mask"]) if not m]
        assert tool == ok_ids * int(
            r["tool_calls"]
        )  # each call's answer, and nothing else, is not the model's
        assert tok.decode(r["token_ids"], skip_special_tokens=True) == r["transcript"]
    assert any(r["tool_calls"] for r in rows)
    cfg, _ = compose_config(
        "eval",
        [*_args(random_model_dir), "eval.problems=2", "eval.samples=2", "eval.k=[1]", "eval.bootstrap=10"],
    )
    eval_cmd.run(cfg, str(tmp_path / "e"), overrides=[])
    for line in (tmp_path / "e" / "eval_completions.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert len(r["token_ids"]) == len(r["model_mask"]) and sum(r["model_mask"]) == r["tokens"]
