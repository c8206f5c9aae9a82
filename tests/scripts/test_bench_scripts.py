"""The benchmark scripts measure what they claim: equal work on both sides, the issue's settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_script


@pytest.fixture(scope="module")
def bench_rollout():
    return load_script("bench_rollout")


@pytest.fixture(scope="module")
def bench_vs_trl():
    return load_script("bench_vs_trl")


def test_bench_rollout_defaults_are_the_issue_settings(bench_rollout):
    args = bench_rollout.parse_args([])
    assert args.lengths == [16, 128, 512] and args.group_size == 8
    model = bench_rollout.build_model(args)
    params = sum(p.numel() for p in model.parameters())
    assert 10e6 <= params <= 50e6  # "a randomly initialised Qwen2 config of ~10-50 M parameters"


def test_every_rollout_path_generates_every_token(bench_rollout):
    """EOS is suppressed on every side, so each produces prompts x G x new-tokens tokens."""
    args = bench_rollout.parse_args(["--hidden", "64", "--layers", "1", "--vocab", "50", "--new-tokens", "6"])
    model = bench_rollout.build_model(args)
    ids = torch.randint(1, args.vocab, (args.prompts, 5))
    mask = torch.ones_like(ids)
    expected = args.prompts * args.group_size * args.new_tokens
    assert bench_rollout.ours(model, ids, mask, args) == expected
    assert bench_rollout.ours_seeded(model, ids, mask, args) == expected
    assert bench_rollout.hf_generate(model, ids, mask, args) == expected


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_our_side_of_the_trl_benchmark_composes_to_the_equal_work_settings(bench_vs_trl, mode, tmp_path):
    from grpo_cli.cli import compose_config

    args = bench_vs_trl.parse_args(["--steps", "4", "--warmup", "2"])
    overrides = [o for o in bench_vs_trl.ours_overrides(mode, args, tmp_path) if not o.startswith("hydra.")]
    cfg, _ = compose_config("train", overrides)
    assert (cfg.algo.group_size, cfg.train.prompts_per_step, cfg.rollout.max_new_tokens) == (8, 8, 8)
    assert (cfg.algo.beta, cfg.algo.num_iterations, cfg.train.steps) == (0.04, 1, 6)
    assert cfg.model.dtype == "float32" and not cfg.model.gradient_checkpointing
    assert cfg.train.eval_every == 0 and cfg.train.lr == args.lr
    assert cfg.lora.enabled == (mode == "lora")
    if mode == "lora":
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, "all-linear")


def test_the_real_shape_composes_to_the_issue_settings(bench_vs_trl, tmp_path):
    from grpo_cli.cli import compose_config

    args = bench_vs_trl.parse_args(["--shape", "qwen2.5-0.5b", "--model-dir", str(tmp_path)])
    args.path = str(tmp_path)
    overrides = [o for o in bench_vs_trl.ours_overrides("lora", args, tmp_path) if not o.startswith("hydra.")]
    cfg, _ = compose_config("train", overrides)
    assert (cfg.algo.group_size, cfg.train.prompts_per_step, cfg.rollout.max_new_tokens) == (8, 2, 128)
    assert cfg.model.name_or_path == str(tmp_path) and not cfg.model.chat_template
    assert cfg.model.dtype == "float32" and cfg.train.eval_problems == 0
    with pytest.raises(SystemExit, match="make_standin"):  # no config.json there: a one-line pointer
        bench_vs_trl.model_path(args)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_dtype_bfloat16_gives_both_sides_bf16_weights(bench_vs_trl, mode, tmp_path, monkeypatch):
    """--dtype bfloat16: ours model.dtype=bfloat16; the TRL child is told the dtype and its config asks
    for bf16 (TRL itself is not imported: a stand-in GRPOConfig records the keywords)."""
    from grpo_cli.cli import compose_config

    assert bench_vs_trl.parse_args([]).dtype == "float32"
    args = bench_vs_trl.parse_args(["--dtype", "bfloat16"])
    overrides = [o for o in bench_vs_trl.ours_overrides(mode, args, tmp_path) if not o.startswith("hydra.")]
    cfg, _ = compose_config("train", overrides)
    assert cfg.model.dtype == "bfloat16" and cfg.model.device == "cpu"
    monkeypatch.setitem(sys.modules, "trl", SimpleNamespace(GRPOConfig=dict))
    assert bench_vs_trl.trl_config(mode, args, str(tmp_path))["bf16"] is True
    assert bench_vs_trl.trl_config(mode, bench_vs_trl.parse_args([]), str(tmp_path))["bf16"] is False
    seen = []

    def fake_child(cmd, log_path):  # what run_trl would start, without starting it
        seen.append(cmd)
        Path(cmd[cmd.index("--json-out") + 1]).write_text(json.dumps({"step_times": [1.0]}))
        return 1

    monkeypatch.setattr(bench_vs_trl, "run_child", fake_child)
    bench_vs_trl.run_trl(mode, args, tmp_path)
    child = bench_vs_trl.parse_args(seen[0][2:])
    assert (child.child, child.mode, child.dtype) == ("trl", mode, "bfloat16")


def test_the_table_names_the_dtype(bench_vs_trl, capsys):
    side = {"step_s": 1.0, "gen_s": 0.5, "rss_mib": 100.0, "gen_tok_s": 10.0, "len": 8.0, "n": 4}
    bench_vs_trl.print_table({"lora": {"ours": side, "trl": side}}, "bfloat16")
    head, row = capsys.readouterr().out.splitlines()
    assert head.split()[:2] == ["mode", "dtype"] and row.split()[:2] == ["lora", "bfloat16"]


def test_demo_tools_splits_problems_by_whether_precedence_matters():
    """scripts/demo_tools.py: 'hard' problems are those left-to-right evaluation gets wrong; the
    defaults are the documented 3 seeds x 200 steps."""
    demo = load_script("demo_tools")
    assert demo.hard("Calculate 2 + 3 * 4") and not demo.hard("Calculate 2 * 3 + 4")
    assert not demo.hard("Calculate 9 - 2 - 3")
    args = demo.parse_args([])
    assert (args.seeds, args.steps, args.problems) == ([0, 1, 2], 200, 200)


def test_bench_async_learn_runs_hf_and_each_staleness_at_the_demo_settings(monkeypatch, capsys, tmp_path):
    """--learn: the default demo (no step or batch override) on hf and on the server at each S, the
    held-out numbers read from each run's first and last evaluation."""
    bench = load_script("bench_async")
    calls = []

    def fake_train(overrides, run_dir):
        calls.append(overrides)
        gain = 0.1 if "rollout.engine=vllm-server" in overrides else 0.2
        return [
            {"step": 0, "eval/accuracy": 0.25, "eval/accuracy_greedy": 0.6},
            {"step": 300, "eval/accuracy": 0.25 + gain, "eval/accuracy_greedy": 0.7, "staleness": 1.0},
        ]

    monkeypatch.setattr(bench, "grpo_train", fake_train)
    bench.learn("http://127.0.0.1:1", bench.parse_args(["--learn", "--staleness", "0", "2"]), tmp_path)
    assert [o for o in calls[0] if o.startswith("rollout.")] == []  # hf: the demo as `make demo` runs it
    assert [o for o in calls[2] if o.startswith("rollout.max_staleness")] == ["rollout.max_staleness=2"]
    assert not any(o.startswith(("train.steps", "train.prompts_per_step")) for c in calls for o in c)
    lines = capsys.readouterr().out.splitlines()
    hf, s2 = next(ln for ln in lines if ln.startswith("hf")), next(ln for ln in lines if "S=2" in ln)
    assert "0.250 -> 0.450" in hf and "+0.000" in hf
    assert "0.250 -> 0.350" in s2 and "-0.100" in s2


def test_skewed_lengths_are_the_issue_mix_and_packing_reaches_our_side(bench_vs_trl, tmp_path):
    """--lengths skewed: per step 8 x 32, 6 x 128, 2 x 512 tokens, max_new_tokens 512 on both sides."""
    from grpo_cli.cli import compose_config

    skewed = bench_vs_trl.SKEWED
    assert sorted(skewed) == [32] * 8 + [128] * 6 + [512] * 2
    args = bench_vs_trl.parse_args(
        ["--shape", "qwen2.5-0.5b", "--model-dir", str(tmp_path), "--lengths", "skewed", "--tokens", "4096"]
    )
    args.path = str(tmp_path)
    overrides = [o for o in bench_vs_trl.ours_overrides("lora", args, tmp_path) if not o.startswith("hydra.")]
    cfg, _ = compose_config("train", overrides)
    assert cfg.rollout.max_new_tokens == 512 and cfg.train.micro_batch_tokens == 4096
    with pytest.raises(SystemExit):  # the tiny shape has 64 completions a step, not the list's 16
        bench_vs_trl.parse_args(["--lengths", "skewed"])


def test_trls_generations_end_at_the_skewed_lengths(bench_vs_trl):
    """TRL's side: row b gets EOS at its length and padding after, which TRL's completion mask reads."""
    prompt = torch.full((16, 3), 9)

    class Model:
        def generate(self, input_ids):
            return torch.cat([input_ids, torch.full((16, 512), 7)], 1)

    model, times = Model(), []
    bench_vs_trl.timed_generate(model, times, (bench_vs_trl.SKEWED, 1, 0))
    out = model.generate(input_ids=prompt)[:, 3:]
    first_eos = (out == 1).int().argmax(1) + 1
    assert first_eos.tolist() == bench_vs_trl.SKEWED and len(times) == 1
    assert all((row[n:] == 0).all() for row, n in zip(out, bench_vs_trl.SKEWED))


def test_our_bench_hook_cuts_completions_to_the_same_list(monkeypatch):
    """scripts/bench_hooks/sitecustomize.py, loaded with GRPO_BENCH_LENGTHS set, cuts the hf engine's output."""
    import importlib.util

    from grpo_cli.engines import hf
    from grpo_cli.engines.protocol import Completion

    monkeypatch.setattr(
        hf.HFEngine, "generate", lambda self, r, d, p=None: [[Completion(list(range(600)))] for _ in r]
    )
    monkeypatch.setenv("GRPO_BENCH_LENGTHS", "32,128")
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_hooks" / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("bench_hook", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    groups = hf.HFEngine.generate(None, [0, 1, 2], None)
    assert [len(g[0].token_ids) for g in groups] == [32, 128, 32]


def test_bench_packing_builds_the_issue_mix_with_real_prompt_lengths():
    bench = load_script("bench_packing")
    assert sorted(bench.MIXES["skewed"]) == [32] * 8 + [128] * 6 + [512] * 2
    args = bench.parse_args([])
    policy, rollout = bench.build(args, "skewed")
    assert rollout.completion_mask.sum(1).tolist() == bench.MIXES["skewed"]
    assert rollout.prompt_mask[:: bench.G].sum(1).tolist() == list(bench.PROMPT_LENGTHS)
    assert policy.is_lora
