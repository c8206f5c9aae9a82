"""End to end with vLLM sampling: `grpo train rollout.engine=vllm` learns as the hf engine does, and
`grpo eval rollout.engine=vllm` on the LoRA checkpoint it wrote agrees with `grpo eval` on hf.

Slow (two 100-step runs of the default recipe, ~2 minutes each on 2 free cores), kept in CI, where
`make install-vllm` runs first; skipped without vLLM.
"""

from __future__ import annotations

import json

import pytest
from helpers import is_timing

from grpo_cli import engines
from grpo_cli.cli import compose_config
from grpo_cli.commands import eval as evaluate
from grpo_cli.commands import train
from grpo_cli.commands.validate import validate
from grpo_cli.run.runlog import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not engines.vllm_available(), reason="vLLM not installed (make install-vllm)"),
    pytest.mark.usefixtures("one_thread"),
]

# As in test_e2e.py: 200 held-out problems x 4 samples, paired before/after, have a standard error of
# ~2 points per gain, ~3 points for the difference of two runs' gains. The hf run gains ~10 points in
# 100 steps; vLLM's gain must be at least 6 points and no more than 2 standard errors below hf's.
STEPS = 100
MARGIN = 0.06
NOISE = 0.06


def _train(engine: str, run_dir) -> tuple[float, float]:
    cfg, _ = compose_config(
        "train",
        [
            f"rollout.engine={engine}",
            f"train.steps={STEPS}",
            "train.eval_every=0",
            "train.eval_at_ends=true",
            "console=plain",
        ],
    )
    validate(cfg)
    train.run(cfg, str(run_dir))
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    return evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_model_path):
    path = tmp_path_factory.mktemp("vllm")
    return path, _train("vllm", path)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tiny_model_path):
    path = tmp_path_factory.mktemp("hf")
    return path, _train("hf", path)


def test_vllm_training_raises_accuracy_as_hf_does(vllm_run, hf_run):
    (v0, v1), (h0, h1) = vllm_run[1], hf_run[1]
    assert v1 - v0 >= MARGIN, f"vllm: sampled accuracy {v0:.3f} -> {v1:.3f}"
    assert v1 - v0 >= (h1 - h0) - NOISE, f"vllm {v0:.3f} -> {v1:.3f}, hf {h0:.3f} -> {h1:.3f}"
    rows = [r for r in read_metrics(vllm_run[0]) if "rollout/logprob_diff" in r]
    assert len(rows) == STEPS  # logged every step
    # Weights pushed after every step: the engine samples what the trainer computes, float rounding aside.
    assert max(r["rollout/logprob_diff"] for r in rows) < 1e-4


def _eval(engine: str, checkpoint, out) -> dict:
    cfg, _ = compose_config(
        "eval",
        [
            f"rollout.engine={engine}",
            f"checkpoint={checkpoint}",
            "eval.problems=200",
            "eval.samples=4",
            "eval.bootstrap=200",
            f"eval.out={out}",
        ],
    )
    validate(cfg)
    evaluate.run(cfg, str(out.parent))
    return json.loads(out.read_text())["results"][0]


def test_vllm_eval_of_lora_checkpoint_within_hf_interval(vllm_run, tmp_path):
    checkpoint = sorted(vllm_run[0].glob("checkpoint-*"))[-1]
    assert (checkpoint / "adapter_config.json").is_file()  # the default recipe trains LoRA
    hf = _eval("hf", checkpoint, tmp_path / "hf.json")
    vl = _eval("vllm", checkpoint, tmp_path / "vllm.json")
    lo, hi = hf["ci95"]["pass@1"]
    assert lo <= vl["metrics"]["pass@1"] <= hi, (vl["metrics"]["pass@1"], hf["ci95"]["pass@1"])
    assert vl["metrics"]["greedy/pass@1"] == pytest.approx(hf["metrics"]["greedy/pass@1"], abs=0.02)


def _rows(run_dir) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not is_timing(k)} for r in read_metrics(run_dir)}


def test_resumed_vllm_run_gets_the_checkpoint_weights_and_continues_the_run(tmp_path, tiny_model_path):
    """The engine is pushed the checkpoint's weights on resume: a resumed run's steps equal the
    uninterrupted run's. The engine last held other weights (the straight run's step 4), so a resume
    without the push would sample from those and depart."""
    base = [
        "rollout.engine=vllm", "lora=none", "algo.beta=0.0", "train.prompts_per_step=4", "algo.group_size=4",
        "train.eval_every=0", "train.eval_problems=8", "train.lr=1e-4", "console=plain",
    ]  # fmt: skip

    def run(run_dir, *extra):
        cfg, _ = compose_config("train", [*base, *extra])
        validate(cfg)
        train.run(cfg, str(run_dir))

    run(tmp_path / "resumed", "train.steps=2")
    run(tmp_path / "straight", "train.steps=4")
    run(tmp_path / "resumed", "train.steps=4", "train.resume=auto")
    ref, got = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    for step in (3, 4):
        assert got[step] == ref[step], step
        assert got[step]["rollout/logprob_diff"] < 1e-4
    assert len({ref[s]["reward"] for s in range(1, 5)}) > 1  # the rows depend on what was sampled
