"""Data-parallel training: torchrun with 2 CPU processes (gloo) against 1 process, resume, failures.

The torchrun tests are slow (each launch loads the tiny model in two processes, about 10-20 s on 2
cores) and kept in CI. Equivalence is checked on what 1 and 2 processes must share exactly — the
sampled completions (hence the rewards) — and, within float32 rounding, the loss and gradient norm
of every step and the final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_cli.cli import compose_config
from grpo_cli.commands.build import build_train_run
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError
from grpo_cli.engines.hf.decode import prompt_generators, sample_group
from grpo_cli.models import load_policy
from grpo_cli.rollout.batch import PromptOrder, draw_seed
from grpo_cli.run.runlog import read_metrics
from grpo_cli.runtime import distributed

# 2 x 8 completions per rank, in micro-batches of 4 (so gradients accumulate before they are
# synchronised), token_mean (whose denominator is the global token count), a learning rate that
# moves the weights well above float32 rounding in 3 steps.
ARGS = [
    "train.steps=3",
    "train.prompts_per_step=4",
    "train.micro_batch_size=4",
    "train.eval_problems=8",
    "train.eval_every=0",
    "train.eval_at_ends=true",
    "train.lr=1e-3",
    "algo.aggregation=token_mean",
    "console=plain",
]
# Float32 tolerances, measured: losses agree to ~1e-8 and weights to ~5e-7 after 3 AdamW steps
# (the sums over ranks and micro-batches add in another order), against ~5e-4 moved in training.
LOSS_ATOL = 1e-6
GRAD_NORM_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
TIMEOUT = 300


# ---------------------------------------------------------------------------- helpers


INJECT = Path(__file__).resolve().parents[1] / "inject"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _grpo(args: list[str], run_dir: Path, nproc: int = 1, env: dict | None = None, timeout: int = TIMEOUT):
    """``grpo train`` in 1 process, or under torchrun with ``nproc`` processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "grpo_cli", "train"]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
        ]
        cmd = [*launcher, "-m", "grpo_cli", "train"]
    return subprocess.run(
        [*cmd, *args, f"hydra.run.dir={run_dir}"],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if r["step"] > 0}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _resume_copy(run: Path, into: Path, step: int) -> None:
    """``into`` as ``run`` was after ``step``: its checkpoint and metric rows up to there."""
    import shutil

    into.mkdir()
    shutil.copytree(run / f"checkpoint-{step}", into / f"checkpoint-{step}")
    rows = [r for r in read_metrics(run) if r["step"] <= step]
    (into / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _assert_continues(run: Path, resumed: Path, steps: tuple[int, ...]) -> None:
    """``resumed`` took ``steps`` as the uninterrupted ``run`` did: rewards, losses, final weights."""
    a, b = _steps(run), _steps(resumed)
    for step in steps:
        assert a[step]["reward"] == b[step]["reward"]
        assert abs(a[step]["loss"] - b[step]["loss"]) <= LOSS_ATOL
    last = f"checkpoint-{steps[-1]}"
    wa, wb = _weights(run / last), _weights(resumed / last)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= WEIGHT_ATOL


def _assert_same_run(one: Path, two: Path, initial: dict[str, torch.Tensor]) -> None:
    a, b = _steps(one), _steps(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        # The same completions: sampling streams are per prompt, not per process.
        assert (
            a[step]["reward"] == b[step]["reward"] and a[step]["completion_len"] == b[step]["completion_len"]
        )
        assert abs(a[step]["loss"] - b[step]["loss"]) <= LOSS_ATOL, step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=GRAD_NORM_RTOL), step
    # The held-out evaluations (step 0 and the last step): shared over the ranks, the same numbers.
    evals = [
        {k: v for k, v in r.items() if k.startswith("eval/")}
        for r in read_metrics(one)
        if "eval/accuracy" in r
    ]
    assert evals and evals == [
        {k: v for k, v in r.items() if k.startswith("eval/")}
        for r in read_metrics(two)
        if "eval/accuracy" in r
    ]
    wa, wb = _weights(one / "checkpoint-3"), _weights(two / "checkpoint-3")
    assert set(wa) <= set(wb)
    moved = max(float((wa[k] - initial[k]).abs().max()) for k in wa if k in initial)
    differ = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert differ <= WEIGHT_ATOL, f"1 vs 2 processes: weights differ by {differ:.2e}"
    assert differ < 0.01 * moved, f"weights moved {moved:.2e} in training, differ by {differ:.2e}"


# ---------------------------------------------------------------------------- in-process pieces


def test_one_process_is_world_size_one():
    w = distributed.init()
    assert (w.rank, w.size, w.is_main, w.enabled) == (0, 1, True, False)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert float(distributed.all_sum(2.5)) == 2.5
    assert distributed.gather_objects("x") == ["x"]


def test_shard_gives_each_rank_whole_contiguous_shares():
    items = list(range(8))
    shares = [distributed.shard(items, distributed.World(r, 4)) for r in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="do not split evenly"):
        distributed.shard(items, distributed.World(0, 3))


def test_the_resume_command_relaunches_with_torchrun(monkeypatch, tmp_path):
    from grpo_cli.run import checkpoint

    assert distributed.launcher() == ["grpo"]
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    command = checkpoint.resume_command(tmp_path, ["algo.beta=0"], launcher=distributed.launcher())
    assert command.startswith("torchrun --nnodes=2 --nproc_per_node=8 -m grpo_cli train algo.beta=0 ")
    assert command.endswith("train.resume=auto")


def test_draw_seeds_depend_on_seed_and_draw_only():
    seeds = [draw_seed(0, d) for d in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert draw_seed(0, 5) == draw_seed(0, 5) != draw_seed(1, 5)
    sampler = PromptOrder(3, seed=0)
    sampler.take(5)  # into the second epoch
    assert sampler.drawn == 5


def test_a_prompts_completions_do_not_depend_on_its_batch(random_model_dir):
    """Per-prompt generators: prompt b sampled beside a, or alone (another rank), gets the same tokens."""
    from grpo_cli.config import LoraConfig, ModelConfig

    policy = load_policy(
        ModelConfig(name_or_path=str(random_model_dir), device="cpu"), LoraConfig(enabled=False), 0.0
    )
    tok, G = policy.tokenizer, 4
    enc = tok(["Calculate 1 + 2 =", "Calculate 30 * 4 ="], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    args = (G, 12, tok.eos_token_id, tok.pad_token_id)
    both, _ = sample_group(policy.model, ids, mask, *args, generators=prompt_generators([11, 22], ids.device))
    alone_enc = tok(["Calculate 30 * 4 ="], return_tensors="pt", padding=True)
    alone, alone_mask = sample_group(
        policy.model,
        alone_enc["input_ids"],
        alone_enc["attention_mask"],
        *args,
        generators=prompt_generators([22], ids.device),
    )
    width = alone.size(1)
    assert torch.equal(both[G:, :width], alone)
    assert (both[G:, width:] == tok.pad_token_id).all()
    # Reseeding b leaves a's completions alone, and changes b's.
    other, _ = sample_group(
        policy.model, ids, mask, *args, generators=prompt_generators([11, 23], ids.device)
    )
    w = min(other.size(1), both.size(1))
    assert torch.equal(other[:G, :w], both[:G, :w])
    assert not torch.equal(other[G:, :w], both[G:, :w])


def test_strategy_is_checked():
    cfg, _ = compose_config("train", ["train.strategy=zero3"])
    with pytest.raises(ConfigError, match="train.strategy='zero3' is not allowed"):
        validate(cfg)
    cfg, _ = compose_config("train", ["train.strategy=fsdp"])  # LoRA by default
    with pytest.raises(ConfigError, match="train.strategy=fsdp shards full fine-tuning"):
        validate(cfg)
    cfg, _ = compose_config("train", ["train.strategy=fsdp", "lora=none"])
    validate(cfg)


def test_prompts_per_step_must_split_over_the_ranks(monkeypatch, tmp_path, random_model_dir):
    cfg, _ = compose_config("train", [f"model.name_or_path={random_model_dir}", "train.prompts_per_step=4"])
    monkeypatch.setattr(distributed, "init", lambda: distributed.World(0, 3))
    with pytest.raises(ConfigError, match="train.prompts_per_step=4: must divide by the 3 ranks"):
        build_train_run(cfg, tmp_path)


# ---------------------------------------------------------------------------- torchrun, 2 processes


@pytest.fixture(scope="module")
def tiny_initial(tiny_model_path) -> dict[str, torch.Tensor]:
    return _weights(Path(tiny_model_path))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_model_path) -> tuple[Path, Path]:
    """The default LoRA run for 3 steps in 1 process and in 2 (DDP)."""
    root = tmp_path_factory.mktemp("ddp")
    _ok(_grpo(ARGS, root / "one"))
    _ok(_grpo([*ARGS, "train.save_every=1", "train.keep_checkpoints=0"], root / "two", nproc=2))
    return root / "one", root / "two"


@pytest.mark.slow
def test_ddp_two_processes_match_one(ddp_runs):
    one, two = ddp_runs
    # LoRA: the checkpoint is the adapter, whose B matrices start at zero (what training moved).
    adapter = _weights(one / "checkpoint-3")
    _assert_same_run(one, two, {k: torch.zeros_like(v) for k, v in adapter.items() if "lora_B" in k})
    # Rank 0 alone wrote: one metrics row per step, one checkpoint per step, no stray Hydra output.
    assert [r["step"] for r in read_metrics(two)] == [0, 1, 2, 3]
    assert sorted(p.name for p in two.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    state = torch.load(two / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2


@pytest.mark.slow
def test_two_process_run_resumes_with_two_and_evaluates_in_one(ddp_runs, tmp_path):
    _, two = ddp_runs
    run = tmp_path / "resumed"
    # Stop after step 1 (as if killed), then continue with 2 processes from checkpoint-1.
    _resume_copy(two, run, 1)
    _ok(_grpo([*ARGS, "train.resume=auto"], run, nproc=2))
    _assert_continues(two, run, steps=(2, 3))
    # The 2-process checkpoint in a 1-process eval.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_cli",
            "eval",
            f"checkpoint={run / 'checkpoint-3'}",
            "eval.problems=4",
            "eval.samples=2",
            "eval.k=[1,2]",
            "eval.bootstrap=10",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _ok(proc)
    assert "pass@1" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(ddp_runs, tmp_path):
    """Another world size: sampling streams are per prompt, so the run goes on as it would have."""
    _, two = ddp_runs
    run = tmp_path / "one-after-two"
    _resume_copy(two, run, 1)
    proc = _grpo([*ARGS, "train.resume=auto"], run)
    _ok(proc)
    assert "the checkpoint was written by 2 ranks, this run has 1" in proc.stdout + proc.stderr
    _assert_continues(two, run, steps=(2, 3))


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, tiny_initial):
    # scale_rewards=batch: the std is taken over every rank's rewards, as over the 1-process batch.
    args = [*ARGS, "lora=none", "algo.scale_rewards=batch"]
    _ok(_grpo(args, tmp_path / "one"))
    fsdp = [*args, "train.strategy=fsdp", "train.save_every=1", "train.keep_checkpoints=0"]
    _ok(_grpo(fsdp, tmp_path / "two", nproc=2))
    _assert_same_run(tmp_path / "one", tmp_path / "two", tiny_initial)
    # Resume from the gathered checkpoint-2 (full weights + full optimizer state, resharded on load).
    _resume_copy(tmp_path / "two", tmp_path / "resumed", 2)
    _ok(_grpo([*fsdp, "train.resume=auto"], tmp_path / "resumed", nproc=2))
    assert _steps(tmp_path / "resumed")[3]["loss"] == _steps(tmp_path / "two")[3]["loss"]
    wa, wb = _weights(tmp_path / "two" / "checkpoint-3"), _weights(tmp_path / "resumed" / "checkpoint-3")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= WEIGHT_ATOL
    # The gathered full weights load as a plain model, in one process.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "checkpoint-3")
    assert model.lm_head.weight is model.get_input_embeddings().weight or torch.equal(
        model.lm_head.weight, model.get_input_embeddings().weight
    )


@pytest.mark.slow
def test_a_failing_rank_ends_the_job(tmp_path):
    run = tmp_path / "fail"
    proc = _grpo(
        [*ARGS, "train.save_every=1", "train.steps=4"],
        run,
        nproc=2,
        env=_env(GRPO_TEST_FAIL_RANK="1:2", PYTHONPATH=str(INJECT)),  # tests/inject/sitecustomize.py
        timeout=120,  # a hang fails the test here instead of stalling CI
    )
    assert proc.returncode != 0
    assert "rank 1 fails at step 2" in proc.stderr
    # What was written before the failure is intact.
    assert (run / "checkpoint-1" / "trainer_state.pt").is_file()
    assert [r["step"] for r in read_metrics(run)] == [0, 1]


@pytest.mark.slow
def test_dynamic_sampling_keeps_the_ranks_in_step(tmp_path):
    """Each rank resamples until every rank has its share of informative groups: no rank waits alone."""
    run = tmp_path / "dapo"
    _ok(_grpo([*ARGS, "algo=dapo", "algo.max_sampling_rounds=3", "train.steps=2"], run, nproc=2, timeout=180))
    rows = _steps(run)
    assert sorted(rows) == [1, 2]
    assert all(1 <= r["sampling_rounds"] <= 3 for r in rows.values())


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_on_every_rank_and_prints_a_torchrun_resume_command(tmp_path):
    import signal
    import time

    run = tmp_path / "stopped"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*ARGS, "train.steps=500"]  # far more than it will run
    proc = subprocess.Popen(
        [*launcher, "-m", "grpo_cli", "train", *args, f"hydra.run.dir={run}"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        metrics = run / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count("\n") < 3:  # whole rows of steps 0, 1, 2
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    said = out + err  # Hydra's log handler prints to stdout
    last = max(r["step"] for r in read_metrics(run))
    assert (run / f"checkpoint-{last}" / "trainer_state.pt").is_file(), said[-3000:]
    assert f"stopped by SIGTERM after step {last}" in said
    assert "torchrun --nnodes=1 --nproc_per_node=2 -m grpo_cli train" in said


@pytest.mark.slow
def test_packed_micro_batches_on_two_fsdp_processes_match_one(tmp_path, tiny_initial):
    """train.micro_batch_tokens under FSDP (every forward gathers weights, so both ranks must make the
    same number of packed passes): the 2-process run is the 1-process run, and both have the padded
    run's losses to float32 rounding."""
    args = [*ARGS, "lora=none", "algo.scale_rewards=batch"]
    packed = [*args, "train.micro_batch_size=null", "train.micro_batch_tokens=40"]
    _ok(_grpo(args, tmp_path / "padded"))
    _ok(_grpo(packed, tmp_path / "one"))
    _ok(_grpo([*packed, "train.strategy=fsdp", "train.save_every=3"], tmp_path / "two", nproc=2))
    _assert_same_run(tmp_path / "one", tmp_path / "two", tiny_initial)
    padded, one = _steps(tmp_path / "padded"), _steps(tmp_path / "one")
    for step in padded:
        assert abs(padded[step]["loss"] - one[step]["loss"]) <= LOSS_ATOL, step
        assert one[step]["grad_norm"] == pytest.approx(padded[step]["grad_norm"], rel=GRAD_NORM_RTOL), step
