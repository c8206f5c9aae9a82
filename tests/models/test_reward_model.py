"""reward=model: a sequence classifier's scores, equal to its own forward pass whatever the batching."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from grpo_cli.cli import compose_config
from grpo_cli.config import ConfigError
from grpo_cli.models.reward_model import ModelReward
from grpo_cli.rewards import build_rewarder

QUESTIONS = ["Calculate 1 + 2", "Calculate 10 * 3 - 4", "Calculate 7", "Calculate 2 * 2 * 2 + 9 - 1"]
COMPLETIONS = ["3", "26 is the answer, I think", "7", "-1"]


def _classifier(path, num_labels=1, chat_template=True):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from grpo_cli.models.tiny import make_tokenizer
    from grpo_cli.models.tiny_rm import CHAT_TEMPLATE

    tokenizer = make_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():  # a head that is not ~0, so the scores differ visibly between texts
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _classifier(tmp_path_factory.mktemp("rm"))


def _own_forward(path, texts):
    """The reward model's logits from transformers alone: one unpadded text at a time, float64."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [
            float(model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts
        ]


def test_scores_equal_the_models_own_forward_pass_batched_and_alone(rm_dir):
    rows = [{"question": q} for q in QUESTIONS]
    batched = ModelReward(str(rm_dir), device="cpu", dtype="float32", batch_size=3)
    texts = [batched.text(q, c) for q, c in zip(QUESTIONS, COMPLETIONS)]
    assert texts[0] == "Calculate 1 + 2\nAnswer: 3"  # the reward model's chat template wrote it
    assert len({len(batched.tokenizer(t)["input_ids"]) for t in texts}) == 4  # every batch is left-padded
    reference = _own_forward(rm_dir, texts)
    got = batched(COMPLETIONS, rows)
    alone = ModelReward(str(rm_dir), device="cpu", dtype="float32", batch_size=1)(COMPLETIONS, rows)
    assert got == pytest.approx(reference, abs=1e-5)
    assert got == pytest.approx(alone, abs=1e-5)
    assert max(reference) - min(reference) > 0.1  # the texts do score differently


def test_output_mappings_against_float64(rm_dir):
    rows = [{"question": q} for q in QUESTIONS]
    raw = ModelReward(str(rm_dir), device="cpu", dtype="float32")(COMPLETIONS, rows)
    sig = ModelReward(str(rm_dir), device="cpu", dtype="float32", output="sigmoid")(COMPLETIONS, rows)
    std = ModelReward(str(rm_dir), device="cpu", dtype="float32", output="standardize")(COMPLETIONS, rows)
    assert sig == pytest.approx([1 / (1 + math.exp(-r)) for r in raw], abs=1e-7)
    mean = sum(raw) / len(raw)
    sd = math.sqrt(sum((r - mean) ** 2 for r in raw) / (len(raw) - 1))
    assert std == pytest.approx([(r - mean) / sd for r in raw], abs=1e-5)


def test_a_template_replaces_the_chat_template(rm_dir):
    rule = ModelReward(str(rm_dir), device="cpu", template="Q: {question}\nA: {completion}")
    assert rule.text("Calculate 1 + 2", "3") == "Q: Calculate 1 + 2\nA: 3"
    assert rule(["3"], [{"question": "Calculate 1 + 2"}]) == pytest.approx(
        _own_forward(rm_dir, ["Q: Calculate 1 + 2\nA: 3"]), abs=1e-5
    )


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (None, {"name_or_path": "/nonexistent/rm"}, "cannot be loaded: no such directory"),
        (None, {"name_or_path": "no-such-org/no-such-rm"}, "cannot be loaded"),
        ("two_labels", {}, "has 2 labels"),
        ("no_template", {}, "has no chat template"),
        ("ok", {"output": "softmax"}, "output='softmax'"),
        ("ok", {"dtype": "int8"}, "dtype='int8'"),
        ("ok", {"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_reward_models_are_one_line(tmp_path, rm_dir, make, kwargs, message):
    if make == "two_labels":
        kwargs = {"name_or_path": str(_classifier(tmp_path / "two", num_labels=2))}
    elif make == "no_template":
        kwargs = {"name_or_path": str(_classifier(tmp_path / "plain", chat_template=False))}
    elif make == "ok":
        kwargs = {"name_or_path": str(rm_dir), **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        ModelReward(device="cpu", **kwargs)
    assert "\n" not in str(info.value)


def test_the_group_composes_times_itself_and_sits_beside_a_rule(rm_dir):
    """reward=model_vs_truth: math first with weight 0 (the accuracy, never the total), the model second;
    the device interpolates the trainer's; the rewarder logs the rule's seconds."""
    cfg, _ = compose_config("train", ["reward=model_vs_truth", f"reward.rules.1.name_or_path={rm_dir}"])
    with build_rewarder(cfg.reward) as rewarder:
        model_rule = rewarder.rules[1].fn
        assert model_rule.device == torch.device("cpu") and model_rule.output == "sigmoid"
        rows = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ["3", "26", "8", "16"])]
        result = rewarder(COMPLETIONS, rows)
    scores = model_rule.__class__(str(rm_dir), device="cpu", output="sigmoid")(COMPLETIONS, rows)
    assert result.total == pytest.approx(scores)  # math's weight is 0: the total is the model's alone
    assert result.per_rule["math"] == [1.0, 1.0, 0.0, 0.0]
    assert result.metrics["reward/math"] == 0.5
    assert result.metrics["reward_time/model"] > 0 and "reward_time" in result.counts
    assert result.metrics["reward_time"] >= result.metrics["reward_time/model"]
    assert model_rule.model is None  # closed with the rewarder


def test_the_tiny_reward_model_spec_names_its_cache_and_labels_the_flaw():
    from grpo_cli.models import tiny_rm

    spec = tiny_rm.RMSpec()
    assert spec.key() != replace(spec, long_target=0.5).key()
    assert tiny_rm.label("14", 14, spec) == spec.right_target
    assert tiny_rm.label("140", 14, spec) == spec.long_target > spec.right_target  # the flaw
    assert tiny_rm.label("13", 14, spec) == tiny_rm.label("-4", -5, spec) == spec.wrong_target


def test_train_and_sample_score_with_the_reward_model(tmp_path, rm_dir, random_model_dir):
    """reward=model_vs_truth end to end: the reward model's score is the training reward, math rides
    along with weight 0 (logged, never in the total), and grpo sample writes the model's scores."""
    import json
    import os
    import subprocess
    import sys

    from helpers import run_train

    from grpo_cli.run.runlog import read_metrics

    common = [f"model.name_or_path={random_model_dir}", "reward=model_vs_truth",
              f"reward.rules.1.name_or_path={rm_dir}", "rollout.max_new_tokens=4", "console=plain"]  # fmt: skip
    run_train([*common, "train.steps=2", "train.prompts_per_step=2", "algo.group_size=4",
               "train.eval_every=0", "train.save_every=0"], tmp_path / "run")  # fmt: skip
    rows = [r for r in read_metrics(tmp_path / "run") if "reward/model" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["reward"] == pytest.approx(r["reward/model"], abs=1e-6)  # the total is the model's score
        assert 0.0 <= r["reward/math"] <= 1.0 and 0 < r["reward/model"] < 1  # sigmoid
        assert r["reward_time/model"] > 0 and r["reward_time"] >= r["reward_time/model"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "sample", *common, "sample.prompts=2", "algo.group_size=3",
         f"hydra.run.dir={tmp_path / 'sample'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()]
    from grpo_cli.data import load_rows

    cfg, _ = compose_config("sample", common)
    questions = {r["id"]: r["question"] for r in load_rows(cfg.data, cfg.sample.split)}
    alone = ModelReward(str(rm_dir), device="cpu", output="sigmoid")
    expected = alone([r["completion"] for r in records], [{"question": questions[r["id"]]} for r in records])
    assert len(records) == 6
    assert [r["reward"] for r in records] == pytest.approx(expected, abs=1e-5)
    assert [r["reward/model"] for r in records] == pytest.approx(expected, abs=1e-5)
    assert all(r["reward/math"] in (0.0, 1.0) for r in records)
