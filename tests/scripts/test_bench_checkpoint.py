"""scripts/bench_checkpoint.py compares like with like: the old save writes the files the new one writes
(less the manifest), of a full fine-tuning run whose AdamW moments exist, and every figure is printed."""

from __future__ import annotations

import pytest
from helpers import load_script

from grpo_cli.run import checkpoint


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_checkpoint")


def test_both_saves_write_the_same_files_of_a_filled_optimizer(bench, random_model_dir, tmp_path):
    args = bench.parse_args(["--model", str(random_model_dir)])
    policy, state, config_yaml = bench.build(args)
    moments = list(state["optimizer"]["state"].values())
    assert moments and all({"exp_avg", "exp_avg_sq"} <= set(m) for m in moments)
    old = bench.save_without_manifest(tmp_path, 1, policy, state, config_yaml)
    new = checkpoint.save(tmp_path, 2, checkpoint.Saved(policy.model, policy.tokenizer, state, config_yaml))
    old_files = {p.name: p.stat().st_size for p in old.iterdir()}
    new_files = {p.name: p.stat().st_size for p in new.iterdir()}
    assert set(new_files) == set(old_files) | {"manifest.json"}
    assert new_files["model.safetensors"] == old_files["model.safetensors"]


def test_the_table_has_every_operation(bench, random_model_dir, tmp_path, capsys):
    bench.main(["--model", str(random_model_dir), "--repeat", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in (
        "save, no manifest",
        "save, manifest",
        "hash all, second pass",
        "verify (resume)",
        "load (resume)",
    ):
        assert name in out
    assert "uptime:" in out and "cpu:" in out
