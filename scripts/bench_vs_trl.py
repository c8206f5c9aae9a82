"""Step time and peak memory of ``grpo train`` against TRL's ``GRPOTrainer`` at equal work; by hand, never in CI.

    make bench-env                                                        # once: .venv-bench with torch + trl
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_vs_trl.py            # ~10 min on 1 busy CPU core
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_vs_trl.py --modes lora --steps 5 --repeats 1   # ~1 min
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_vs_trl.py --dtype bfloat16 --modes lora --steps 5 --repeats 1
    .venv/bin/python scripts/bench_vs_trl.py --shape qwen2.5-0.5b --model-dir /tmp/qwen-standin-4 \
        --steps 2 --warmup 1 --repeats 1                                  # real shapes, ~1 h on 2 busy cores
    .venv/bin/python scripts/bench_vs_trl.py --shape qwen2.5-0.5b --model-dir /tmp/qwen-standin-4 --modes lora \
        --steps 2 --warmup 1 --repeats 1 --lengths skewed --tokens 4096   # a realistic length mix, ~35 min

This script installs nothing: TRL lives in the separate environment ``make bench-env`` makes
(``.venv-bench``: torch, this package, trl), so the project's own environment never depends on it.

Equal work on both sides. ``--shape tiny`` (the default): the embedded tiny model
(``grpo_cli.models.tiny.ensure_tiny()``), 8 prompts x G = 8 per step, 8 new tokens. ``--shape qwen2.5-0.5b``:
a random-weight stand-in with Qwen2.5-0.5B's dimensions and 4 layers (``--model-dir``, made by
``scripts/make_standin.py --layers 4 --dtype float32``; 151,936-token vocabulary), 2 prompts x G = 8,
128 new tokens (random weights draw ``<|im_end|>`` about once in 150,000 tokens, so every completion
runs the full length on both sides; the table shows the mean lengths). Both: CPU, ``--dtype``
weights (float32 by default), no gradient checkpointing; arithmetic train prompts with the ``math``
reward (math-verify, the same rule object on both sides), no chat template; TRL's ``per_device_train_batch_size`` counts
completions (prompts x G); temperature 1, beta 0.04
(k3 KL to the reference), TRL ``loss_type="grpo"``, one update per rollout (mu = 1), the same
constant learning rate; full fine-tuning (``lora=none``; both keep a frozen reference copy) and LoRA
(r = 16, alpha = 32, all linear layers; the reference is the adapter switched off on both sides).

``--dtype bfloat16``: both sides load bf16 weights (ours ``model.dtype=bfloat16``; TRL ``dtype=`` and
``bf16=True``, accelerate's bf16 autocast), so the matmuls run in bf16 on both; LoRA adapters stay
float32 on both (peft's default). Two differences remain, both small shares of the work: under TRL's
autocast the adapters' matmuls run in bf16 (ours in float32), and TRL takes its log-softmax in the
logits' bf16 (ours in float32). Full fine-tuning of bf16 weights at ``--lr 1e-5`` loses most updates on
both sides (``grpo train`` warns); the step's work is the same.

Each run is its own subprocess: ours is ``.venv/bin/python -m grpo_cli train ...`` and its per-step
``step_time`` (sampling + scoring + reference pass + update; the held-out evaluations at step 0 and at
the end are outside it) is read back from ``metrics.jsonl``; TRL's is this script with ``--child trl``
under ``.venv-bench/bin/python``, a ``TrainerCallback`` timing each optimizer step. The first
``--warmup`` steps are dropped. Runs alternate ours, TRL, ours, TRL... over ``--repeats`` rounds;
step time is the median over all kept steps of all rounds, peak RSS the largest ``ru_maxrss`` of a run
(``os.wait4`` on the child: its own peak, or a reaped grandchild's if larger). Rollout tokens/s is
completion tokens over generation time (``gen_time`` for ours; a wrapper around ``model.generate`` for
TRL). Targets (issue 8): step-time ratio ours / TRL <= 0.5 and peak-RSS ratio <= 1.0 in both modes.

``--lengths skewed`` (real shapes): both sides generate 512 tokens and each step's 16 completions are
cut to one fixed list (``SKEWED``: 8 x 32, 6 x 128, 2 x 512 tokens): TRL's generations get EOS at the
cut, ours are cut by ``scripts/bench_hooks/sitecustomize.py``. ``--tokens N`` runs ours with
``train.micro_batch_tokens=N`` (packed micro-batches). Targets (issue 29), LoRA float32 with
``--tokens 4096``: step time <= 0.35, peak RSS <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without install

BETA = 0.04
# shape -> prompts per step, G, new tokens
SHAPES = {"tiny": (8, 8, 8), "qwen2.5-0.5b": (2, 8, 128)}
LORA = {"r": 16, "alpha": 32}
# --lengths skewed: each step's 16 completions cut to these lengths on both sides (8 of 32 tokens, 6 of
# 128, 2 of 512: GSM8K-style reasoning with two runaways), a fixed list, so the update sees the same mix.
SKEWED = [32, 128, 32, 512, 32, 128, 32, 128] * 2
HOOKS = REPO / "scripts" / "bench_hooks"
DTYPES = ("float32", "bfloat16")  # --dtype: model.dtype on our side, dtype= and bf16= on TRL's
MATH_RULE = {"name": "math", "_target_": "grpo_cli.rewards.math.MathReward", "weight": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model and workload (see above)")
    p.add_argument("--model-dir", help="--shape qwen2.5-0.5b: the stand-in model directory")
    p.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="rounds of ours, TRL per mode")
    p.add_argument("--lr", type=float, default=1e-5, help="constant learning rate on both sides")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights on both sides (see above)")
    p.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--trl-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    p.add_argument(
        "--lengths",
        choices=["full", "skewed"],
        default="full",
        help="full: every completion runs max_new_tokens (random weights); skewed: cut to SKEWED, "
        "max_new_tokens 512 (--shape qwen2.5-0.5b)",
    )
    p.add_argument("--tokens", type=int, default=0, help="ours: train.micro_batch_tokens (0: padded)")
    p.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["full", "lora"], default="lora", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.prompts, args.group_size, args.new_tokens = SHAPES[args.shape]
    if args.lengths == "skewed":
        if args.prompts * args.group_size != len(SKEWED):
            p.error(f"--lengths skewed needs {len(SKEWED)} completions a step (--shape qwen2.5-0.5b)")
        args.new_tokens = max(SKEWED)
    return args


def model_path(args: argparse.Namespace) -> str:
    """The model both sides load: the tiny model, or the stand-in directory given."""
    if args.shape == "tiny":
        from grpo_cli.models.tiny import ensure_tiny

        return str(ensure_tiny(quiet=True))
    if not args.model_dir or not (Path(args.model_dir) / "config.json").is_file():
        sys.exit(
            f"--shape {args.shape}: --model-dir must name a stand-in model directory (got {args.model_dir}); "
            "make one with scripts/make_standin.py --out DIR --layers 4 --dtype float32"
        )
    return str(Path(args.model_dir).resolve())


def run_child(cmd: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` to completion; returns its peak RSS in MiB (raises if it failed)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra_env or {}),
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; log {log_path}:\n{tail}")
    return usage.ru_maxrss // 1024  # Linux: KiB


def ours_overrides(mode: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [
        "lora=none" if mode == "full" else "lora=default",
        *([] if mode == "full" else [f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}"]),
        *(["model=tiny"] if args.shape == "tiny" else ["model=qwen", f"model.name_or_path={args.path}"]),
        "model.chat_template=false",
        f"model.dtype={args.dtype}",
        "model.device=cpu",
        "model.gradient_checkpointing=false",
        "data=arithmetic",
        "reward=math",
        f"algo.group_size={args.group_size}",
        f"algo.beta={BETA}",
        "algo.num_iterations=1",
        f"train.prompts_per_step={args.prompts}",
        f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.temperature=1.0",
        f"train.steps={args.warmup + args.steps}",
        f"train.lr={args.lr}",
        "train.warmup_steps=0",
        "train.eval_every=0",
        f"train.eval_problems={8 if args.shape == 'tiny' else 0}",  # no held-out pass at real shapes: minutes, outside step_time
        "train.log_completions_every=0",
        "console=plain",
        f"train.micro_batch_tokens={args.tokens}",
        f"hydra.run.dir={run_dir}",
    ]


def run_ours(mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    run_dir = work / f"ours-{mode}-{time.monotonic_ns()}"
    cmd = [args.ours_python, "-m", "grpo_cli", "train", *ours_overrides(mode, args, run_dir)]
    hook = {}
    if args.lengths == "skewed":  # scripts/bench_hooks/sitecustomize.py cuts the completions
        hook = {"PYTHONPATH": str(HOOKS), "GRPO_BENCH_LENGTHS": ",".join(map(str, SKEWED))}
    rss = run_child(cmd, work / f"{run_dir.name}.log", hook)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r.get("step_time") is not None and r["step"] > args.warmup]
    tokens = [r["completion_len"] * args.prompts * args.group_size for r in kept]
    return {
        "step_times": [r["step_time"] for r in kept],
        "gen_times": [r["gen_time"] for r in kept],
        "completion_len": [r["completion_len"] for r in kept],
        "gen_tok_s": [t / r["gen_time"] for t, r in zip(tokens, kept)],
        "rss_mib": rss,
    }


def run_trl(mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"trl-{mode}-{time.monotonic_ns()}.json"
    cmd = [args.trl_python, __file__, "--child", "trl", "--mode", mode, "--json-out", str(out)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
    cmd += ["--dtype", args.dtype, "--lengths", args.lengths]
    cmd += ["--shape", args.shape, *(["--model-dir", args.model_dir] if args.model_dir else [])]
    rss = run_child(cmd, out.with_suffix(".log"))
    return {**json.loads(out.read_text()), "rss_mib": rss}


# ---------------------------------------------------------------------------- the TRL child


def trl_dataset(n: int) -> Any:
    """Arithmetic train rows as a ``datasets.Dataset`` with TRL's ``prompt`` column (our template)."""
    from datasets import Dataset

    from grpo_cli.config import DataConfig
    from grpo_cli.data import build_prompt, load_rows
    from grpo_cli.models.tiny import TEMPLATE

    rows = load_rows(DataConfig(name="arithmetic", template=TEMPLATE), "train")[:n]
    return Dataset.from_list([{**r, "prompt": build_prompt(r, TEMPLATE)} for r in rows])


def trl_reward(counter: dict[str, float]) -> Any:
    """Our ``math`` rule as a TRL reward function; counts the completion tokens it sees."""
    from grpo_cli.rewards import build_rewarder

    rewarder = build_rewarder([MATH_RULE])

    def math_reward(prompts: list, completions: list[str], completion_ids: list, **columns: Any) -> list:
        counter["tokens"] += sum(len(ids) for ids in completion_ids)
        keys = [k for k in ("question", "answer", "id") if k in columns]
        rows = [{k: columns[k][i] for k in keys} for i in range(len(completions))]
        return [None if r is None else float(r) for r in rewarder(completions, rows).total]

    return math_reward


def trl_config(mode: str, args: argparse.Namespace, out_dir: str) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts * args.group_size,  # completions, not prompts
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=BETA,
        loss_type="grpo",
        num_iterations=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16",  # accelerate's bf16 autocast, over weights loaded in --dtype
        fp16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        log_completions=False,
        dataloader_num_workers=0,
        seed=0,
    )


def timed_generate(model: Any, gen_times: list[float], cut: tuple[list[int], int, int] | None = None) -> None:
    """Wrap ``model.generate`` (instance attribute) to time every call TRL makes; with ``cut`` (lengths,
    EOS id, pad id), row b's completion ends with EOS at ``lengths[b % len(lengths)]`` tokens, as
    ``--lengths`` cuts ours."""
    inner = model.generate

    def generate(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            out = inner(*a, **kw)
        finally:
            gen_times.append(time.perf_counter() - t0)
        if cut is not None:
            lengths, eos, pad = cut
            prompt_len = (kw.get("input_ids") if "input_ids" in kw else a[0]).size(1)
            for b in range(out.size(0)):
                end = prompt_len + lengths[b % len(lengths)]
                out[b, end - 1] = eos
                out[b, end:] = pad
        return out

    model.generate = generate


def trl_child(args: argparse.Namespace) -> None:
    """Train with TRL's GRPOTrainer; write per-step times and generation tokens/s to ``--json-out``."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    from grpo_cli.models import load_tokenizer

    path = model_path(args)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    peft = None
    if args.mode == "lora":
        peft = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    step_times: list[float] = []
    counter = {"tokens": 0.0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            step_times.append(time.perf_counter() - self.t0)

    n_rows = args.prompts * (args.warmup + args.steps + 1)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=trl_reward(counter),
            args=trl_config(args.mode, args, out_dir),
            train_dataset=trl_dataset(n_rows),
            processing_class=load_tokenizer(path),
            peft_config=peft,
            callbacks=[StepTimer()],
        )
        gen_times: list[float] = []
        tok = load_tokenizer(path)
        cut = (SKEWED, tok.eos_token_id, tok.pad_token_id) if args.lengths == "skewed" else None
        timed_generate(trainer.model, gen_times, cut)
        trainer.train()
    total_tokens_per_call = counter["tokens"] / max(len(gen_times), 1)
    result = {
        "step_times": step_times[args.warmup :],
        "gen_times": gen_times[args.warmup :],
        "gen_tok_s": [total_tokens_per_call / t for t in gen_times[args.warmup :]],
        "completion_len": [total_tokens_per_call / (args.prompts * args.group_size)],
    }
    Path(args.json_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- the table


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    steps = [t for r in runs for t in r["step_times"]]
    gen = [t for r in runs for t in r["gen_tok_s"]]
    gen_s = [t for r in runs for t in r.get("gen_times", [])]
    lengths = [n for r in runs for n in r.get("completion_len", [])]
    return {
        "step_s": statistics.median(steps),
        "gen_s": statistics.median(gen_s) if gen_s else float("nan"),
        "len": statistics.mean(lengths) if lengths else float("nan"),
        "rss_mib": max(r["rss_mib"] for r in runs),
        "gen_tok_s": statistics.median(gen) if gen else float("nan"),
        "n": len(steps),
    }


def print_table(results: dict[str, dict[str, dict[str, float]]], dtype: str) -> None:
    head = f"{'mode':<5} {'dtype':<8} {'ours s/step':>11} {'TRL s/step':>10} {'ratio':>6}"
    head += f" {'ours gen s':>10} {'TRL gen s':>9}"
    head += f" {'ratio':>6} {'ours RSS MiB':>12} {'TRL RSS MiB':>11} {'ratio':>6}"
    print(head + f" {'ours gen tok/s':>14} {'TRL gen tok/s':>13} {'mean len':>11} {'steps':>6}")
    for mode, r in results.items():
        o, t = r["ours"], r["trl"]
        print(
            f"{mode:<5} {dtype:<8} {o['step_s']:>11.3f} {t['step_s']:>10.3f} {o['step_s'] / t['step_s']:>6.2f} "
            f"{o['gen_s']:>10.3f} {t['gen_s']:>9.3f} {o['gen_s'] / t['gen_s']:>6.2f} "
            f"{o['rss_mib']:>12.0f} {t['rss_mib']:>11.0f} {o['rss_mib'] / t['rss_mib']:>6.2f} "
            f"{o['gen_tok_s']:>14.0f} {t['gen_tok_s']:>13.0f} {o['len']:>5.1f}/{t['len']:<5.1f} "
            f"{o['n']:>3}/{t['n']:<3}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "trl":
        return trl_child(args)
    if not Path(args.trl_python).exists():
        sys.exit(f"{args.trl_python} not found: make the TRL environment first with `make bench-env`")
    args.path = model_path(args)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        work = Path(tmp)
        for mode in args.modes:
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
            for i in range(args.repeats):
                for side, fn in (("ours", run_ours), ("trl", run_trl)):
                    runs[side].append(fn(mode, args, work))
                    # Each run's numbers as it ends: a long benchmark stopped early keeps what it measured.
                    print(
                        f"{mode} round {i + 1}: {side} {json.dumps(runs[side][-1])}",
                        file=sys.stderr,
                        flush=True,
                    )
            results[mode] = {side: summarise(r) for side, r in runs.items()}
    print(
        f"{args.shape} ({args.path}), {args.prompts} prompts x G={args.group_size}, {args.new_tokens} new tokens, "
        f"beta {BETA}, "
        f"{args.dtype} CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; median of "
        f"{args.steps} steps x {args.repeats} runs after {args.warmup} warm-up steps"
    )
    print_table(results, args.dtype)


if __name__ == "__main__":
    main()
