"""The update's time and peak memory, padded micro-batches against packed ones (``train.micro_batch_tokens``).

    .venv/bin/python scripts/bench_packing.py                                  # tiny model, ~1 min
    .venv/bin/python scripts/bench_packing.py --model-dir /tmp/qwen-standin-4l --repeats 3   # real shapes

One step's update as ``grpo train`` runs it: ``update.prepare`` (the reference pass, beta 0.04) and
``update.update`` (mu = 1: one forward and backward per micro-batch, one AdamW step), LoRA (r 16, all
linear layers; ``--lora none``: full fine-tuning with a reference copy), on a rollout built with fixed
completion lengths, so that padded and packed see the same tokens:

    skewed:   per step 16 completions (2 prompts x G = 8): 8 of 32 tokens, 6 of 128, 2 of 512, spread
              over the two groups (the length mix of GSM8K reasoning with a few runaways)
    uniform:  16 completions of 128 tokens

Prompts are GSM8K-length (60 and 90 tokens), token ids random. Each (mix, layout) runs in its own
subprocess, so its peak RSS (``ru_maxrss``) is its own; runs alternate padded, packed over ``--repeats``
rounds and the update time is the median over every timed step of every round. Padded is
``train.micro_batch_size`` completions per micro-batch (default 64, the shipped default: one
micro-batch per step here); packed is ``--tokens`` tokens per micro-batch. Prints one table of time and
peak RSS per mix with the packed/padded ratios, the CPU and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_vs_trl, when imported by a test

from bench_vs_trl import SKEWED  # noqa: E402  (one length mix for both benchmarks)

G = 8
PROMPT_LENGTHS = (60, 90)
MIXES = {
    # per group of 8: 4 x 32, 3 x 128, 1 x 512 (both groups alike): 8 x 32, 6 x 128, 2 x 512 a step
    "skewed": SKEWED,
    "uniform": [128] * 16,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model-dir", help="a model directory (default: the embedded tiny model)")
    p.add_argument("--lora", choices=["default", "none"], default="default")
    p.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=["skewed", "uniform"])
    p.add_argument("--micro-batch-size", type=int, default=64, help="padded: completions per micro-batch")
    p.add_argument("--tokens", type=int, default=4096, help="packed: tokens per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed updates per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--repeats", type=int, default=2, help="rounds of padded, packed")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "<mix>:<tokens>": run one configuration
    return p.parse_args(argv)


def build(args: argparse.Namespace, mix: str) -> tuple[Any, Any]:
    """The policy (LoRA or full with a reference copy) and a rollout of the mix's lengths."""
    import torch

    from grpo_cli.config import LoraConfig, ModelConfig
    from grpo_cli.models import load_policy
    from grpo_cli.models.tiny import ensure_tiny
    from grpo_cli.rollout.record import Rollout

    path = args.model_dir or str(ensure_tiny())
    lora = LoraConfig(enabled=args.lora == "default")
    policy = load_policy(ModelConfig(name_or_path=path, device="cpu", dtype="float32"), lora, 0.04)
    vocab = policy.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor(MIXES[mix])
    P, L, T = len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), int(lengths.max())
    prompt_mask = torch.zeros(P, L, dtype=torch.long)
    for p, n in enumerate(PROMPT_LENGTHS):
        prompt_mask[p, L - n :] = 1
    prompt_ids = torch.where(prompt_mask.bool(), torch.randint(3, vocab, (P, L), generator=gen), 0)
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids = torch.where(
        completion_mask.bool(), torch.randint(3, vocab, (P * G, T), generator=gen), 0
    )
    rollout = Rollout(
        prompt_ids=prompt_ids.repeat_interleave(G, 0),
        prompt_mask=prompt_mask.repeat_interleave(G, 0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        texts=[""] * (P * G),
        rows=[{}] * (P * G),
        group_size=G,
        rewards=torch.rand(P * G, generator=gen),
        truncated=lengths == T,
    )
    return policy, rollout


def child(args: argparse.Namespace) -> None:
    from grpo_cli.commands.passes import MicroBatching
    from grpo_cli.commands.update import make_optimizer, prepare, update
    from grpo_cli.config import AlgoConfig, TrainConfig

    mix, tokens = args.child.split(":")
    policy, rollout = build(args, mix)
    algo = AlgoConfig(group_size=G, beta=0.04)
    train = TrainConfig(micro_batch_size=args.micro_batch_size, micro_batch_tokens=int(tokens), lr=1e-6)
    micro = MicroBatching.of_train(train, policy.model)
    optimizer, scheduler = make_optimizer(policy, train)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        inputs = prepare(policy, rollout, algo, micro, 1.0)
        stats = update(policy, optimizer, scheduler, inputs, algo, train, 1.0)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(
        json.dumps({"times": times, "rss_mib": rss, "loss": stats["loss"], "rows": len(micro.plan(rollout))})
    )


def run(args: argparse.Namespace, mix: str, tokens: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", f"{mix}:{tokens}", "--lora", args.lora]
    cmd += ["--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise SystemExit(f"{mix} tokens={tokens} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    print(
        f"{cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; model {args.model_dir or 'tiny'}, "
        f"lora={args.lora}, padded micro_batch_size={args.micro_batch_size}, packed micro_batch_tokens={args.tokens}"
    )
    print(
        f"{'mix':8} {'padded s':>9} {'packed s':>9} {'time ratio':>10} {'padded MiB':>11} {'packed MiB':>11} "
        f"{'RSS ratio':>9} {'rows':>5} {'|d loss|':>9}"
    )
    for mix in args.mixes:
        runs: dict[int, list[dict[str, Any]]] = {0: [], args.tokens: []}
        for _ in range(args.repeats):
            for tokens in runs:
                runs[tokens].append(run(args, mix, tokens))
        t = {k: statistics.median(x for r in v for x in r["times"]) for k, v in runs.items()}
        rss = {k: max(r["rss_mib"] for r in v) for k, v in runs.items()}
        dloss = abs(runs[0][0]["loss"] - runs[args.tokens][0]["loss"])
        print(
            f"{mix:8} {t[0]:9.2f} {t[args.tokens]:9.2f} {t[args.tokens] / t[0]:10.2f} {rss[0]:11.0f} "
            f"{rss[args.tokens]:11.0f} {rss[args.tokens] / rss[0]:9.2f} {runs[args.tokens][0]['rows']:5d} "
            f"{dloss:9.1e}"
        )


if __name__ == "__main__":
    main()
