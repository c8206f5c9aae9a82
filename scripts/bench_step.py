"""Where one ``grpo train`` step spends its time: generation, reward, reference pass, forward, backward, optimizer.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py                 # ~1 min on 1 busy CPU core
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py lora=none --steps 10
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py --profile 15     # + torch.profiler's top ops, ~2 min

Builds a trainer exactly as ``grpo train`` does (the same config composition, ``commands.build.build_train_run``) with the
settings of ``scripts/bench_vs_trl.py`` (tiny model, 8 prompts x G = 8, 8 new tokens, beta 0.04, mu = 1;
any extra Hydra override on the command line is applied on top), then runs ``--steps`` steps after
``--warmup``, timing each phase with the same functions the train loop calls: ``rollout.generate``,
``rollout.score``, ``update.prepare`` (reference log-probs), then per micro-batch the loop's own ``update.micro_logps``
+ ``policy_loss`` (forward), ``backward``, and gradient clipping + ``optimizer.step`` (optimizer).
Prints the median seconds of each phase and its share of their sum; ``--profile N`` first runs the
steps once more under ``torch.profiler`` (not timed) and prints the N ops with the most self CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

PHASES = ("generate", "reward", "reference", "forward", "backward", "optimizer")
BASE = [
    "algo.group_size=8",
    "algo.beta=0.04",
    "algo.num_iterations=1",
    "train.prompts_per_step=8",
    "rollout.max_new_tokens=8",
    "model.dtype=float32",
    "model.device=cpu",
    "train.eval_problems=8",
    "console=plain",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. lora=none")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--profile", type=int, default=0, help="also print torch.profiler's top N ops (self CPU)")
    return p.parse_args(argv)


class Clock:
    """Accumulates wall time per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def run(self, phase: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.seconds[phase] += time.perf_counter() - t0
        return out


def timed_step(t: Any, clock: Clock) -> None:
    """One GRPO step (mu = 1, no dynamic sampling), phase by phase."""
    from grpo_cli.commands.passes import MicroBatching, micro_logps
    from grpo_cli.commands.update import prepare
    from grpo_cli.core.loss import aggregation_units, policy_loss
    from grpo_cli.rollout.batch import draw_seed
    from grpo_cli.rollout.generate import score

    cfg, policy = t.cfg, t.policy
    first = t.order.drawn
    picked = [t.rows[i] for i in t.order.take(cfg.train.prompts_per_step)]
    seeds = [draw_seed(cfg.seed, first + i) for i in range(len(picked))]  # per-prompt streams, as the loop
    G = cfg.algo.group_size
    ro = clock.run("generate", t.sampler.generate, picked, G, seeds=seeds)
    ro = clock.run("reward", score, ro, t.rewarder)
    micro, temp = (
        MicroBatching.of_train(cfg.train, policy.model),
        cfg.rollout.temperature,
    )
    inputs = clock.run("reference", prepare, policy, ro, cfg.algo, micro, temp)
    denom = max(float(aggregation_units(inputs.loss_mask, cfg.algo.aggregation)), 1.0)
    # The training loop's own micro-batching (padded or packed) and log-prob pass, phase by phase.
    for s in micro.plan(ro):

        def forward(s: slice | torch.Tensor = s) -> torch.Tensor:
            logps = micro_logps(policy.run, ro, s, cfg.rollout.temperature, packed=bool(micro.tokens))
            ref = None if inputs.ref_logps is None else inputs.ref_logps[s]
            args = (inputs.advantages[s], inputs.loss_mask[s], cfg.algo)
            return policy_loss(logps, None, ref, *args, denominator=denom)[0]

        clock.run("backward", clock.run("forward", forward).backward)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    clock.run("optimizer", torch.nn.utils.clip_grad_norm_, params, cfg.train.max_grad_norm)
    clock.run("optimizer", t.optimizer.step)
    clock.run("optimizer", t.optimizer.zero_grad, set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    from grpo_cli.cli import compose_config
    from grpo_cli.commands.build import build_train_run

    args = parse_args(argv)
    cfg, _ = compose_config("train", BASE + args.overrides)
    per_step: dict[str, list[float]] = {p: [] for p in PHASES}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        with build_train_run(cfg, Path(tmp)) as t:
            for _ in range(args.warmup):
                timed_step(t, Clock())
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps if args.profile else 0):
                    timed_step(t, Clock())
            for _ in range(args.steps):
                clock = Clock()
                timed_step(t, clock)
                for p in PHASES:
                    per_step[p].append(clock.seconds[p])
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    med = {p: statistics.median(v) for p, v in per_step.items()}
    total = sum(med.values())
    print(f"overrides: {' '.join(args.overrides) or '(none)'}; torch threads {torch.get_num_threads()}")
    print(f"{'phase':<10} {'median s':>9} {'share':>6}")
    for p in PHASES:
        print(f"{p:<10} {med[p]:>9.4f} {med[p] / total:>6.1%}")
    print(f"{'sum':<10} {total:>9.4f}")


if __name__ == "__main__":
    main()
