"""Base-model identity (issue 14): an adapter fits its base by config and weights, whatever the path."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.commands import eval as evaluate
from grpo_cli.commands import train
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError
from grpo_cli.models import identity
from grpo_cli.models.tiny import TinySpec, make_model, make_tokenizer


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_fingerprint_ignores_where_the_model_came_from_but_not_what_it_is(tmp_path, tiny_model_path):
    a = copy_model(tiny_model_path, tmp_path / "a")
    b = copy_model(tiny_model_path, tmp_path / "b")
    config = json.loads((b / "config.json").read_text())
    config.update(_name_or_path="/somewhere/else", transformers_version="0.0.1")
    (b / "config.json").write_text(json.dumps(config, indent=4))
    assert identity.fingerprint(str(a)) == identity.fingerprint(str(b)) is not None
    config["rope_theta"] = 1234.0  # a config that computes something else
    (b / "config.json").write_text(json.dumps(config))
    assert identity.fingerprint(str(b)) != identity.fingerprint(str(a))
    # Same architecture, other weights (another seed), and the weights of a fine-tuned copy.
    reseeded = tmp_path / "reseeded"
    make_model(replace(TinySpec(), seed=1), len(make_tokenizer())).save_pretrained(reseeded)
    shutil.copy(a / "config.json", reseeded / "config.json")
    assert identity.fingerprint(str(reseeded)) != identity.fingerprint(str(a))
    assert identity.fingerprint(str(tmp_path / "missing")) is None
    assert identity.fingerprint("no-such-org/no-such-model") is None


SMALL_TRAIN = [
    "train.steps=1", "train.prompts_per_step=2", "algo.group_size=2", "rollout.max_new_tokens=4",
        "train.eval_every=0", "train.eval_problems=2", "train.eval_samples=1", "console=plain",
    ]  # fmt: skip


def test_adapter_trained_under_one_home_evaluates_under_another(tmp_path, tiny_model_path, monkeypatch):
    """The issue's case: the same tiny model in two $GRPO_HOMEs; the first home is gone by eval time."""
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    copy_model(tiny_model_path, home_a / tiny_model_path.name)
    copy_model(tiny_model_path, home_b / tiny_model_path.name)
    monkeypatch.setenv("GRPO_HOME", str(home_a))
    cfg, _ = compose_config("train", SMALL_TRAIN)
    validate(cfg)
    train.run(cfg, str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoint-1"
    record = json.loads((ckpt / identity.RECORD_FILE).read_text())
    assert record["name_or_path"] == str(home_a / tiny_model_path.name)
    assert record["fingerprint"] == identity.fingerprint(str(tiny_model_path))
    shutil.rmtree(home_a)  # only the record in the checkpoint knows what the base was now

    monkeypatch.setenv("GRPO_HOME", str(home_b))
    overrides = [
        f"checkpoint={ckpt}",
        "eval.problems=2",
        "eval.samples=1",
        "eval.greedy=false",
        "eval.bootstrap=5",
    ]
    cfg, _ = compose_config("eval", overrides)
    result = evaluate.run(cfg, str(tmp_path / "eval"))
    assert result["results"][0]["checkpoint"] == str(ckpt) and result["results"][0]["n"] == 1


def test_adapter_of_a_different_base_is_refused_naming_both(tmp_path, tiny_model_path, random_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(random_model_dir), LoraConfig(r=2, target_modules="all-linear")
    )
    model.save_pretrained(tmp_path / "adapter")
    identity.record_base(tmp_path / "adapter", model)
    cfg, _ = compose_config("eval", [f"checkpoint={tmp_path / 'adapter'}"])
    with pytest.raises(ConfigError) as err:
        evaluate.check_checkpoints(cfg, evaluate.checkpoint_names(cfg))
    message = str(err.value)
    assert "\n" not in message and str(random_model_dir) in message and str(tiny_model_path) in message
    assert "their config or weights differ" in message
    # The same weights at another path are the same base.
    copy = copy_model(random_model_dir, tmp_path / "copy-of-random")
    cfg, _ = compose_config("eval", [f"checkpoint={tmp_path / 'adapter'}", f"model.name_or_path={copy}"])
    evaluate.check_checkpoints(cfg, evaluate.checkpoint_names(cfg))


def test_a_hub_id_is_its_local_snapshot(tmp_path, tiny_model_path, monkeypatch):
    """An adapter recorded against a hub id fits a local copy of the same weights, and the reverse."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someorg--tiny"
    copy_model(tiny_model_path, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert identity.local_dir("someorg/tiny") == repo / "snapshots" / "abc123"
    assert identity.fingerprint("someorg/tiny") == identity.fingerprint(str(tiny_model_path))
    adapter = tmp_path / "adapter"
    adapter.mkdir()  # no base_model.json: the fingerprint comes from the recorded hub id's snapshot
    identity.require_same_base(str(adapter), "someorg/tiny", str(tiny_model_path))
    identity.require_same_base(str(adapter), str(tiny_model_path), "someorg/tiny")
    with pytest.raises(ConfigError, match="someorg/other .*unknown: not found here"):
        identity.require_same_base(str(adapter), "someorg/other", str(tiny_model_path))
