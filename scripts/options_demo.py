"""Each loss option on the default demo, one run after another: a table of held-out accuracy.

    .venv/bin/python scripts/options_demo.py --out outputs/options            # every option, ~1.5 min each
    .venv/bin/python scripts/options_demo.py --only grpo sapo --steps 50      # a quick look
    .venv/bin/python scripts/options_demo.py --extra algo.num_iterations=2   # off policy: the ratios move

Per option: ``grpo train console=plain hydra.run.dir=OUT/NAME OVERRIDES`` (the default demo: tiny
model, arithmetic, seed 0), then from its metrics.jsonl the held-out sampled accuracy
(``eval/accuracy``) and greedy accuracy (``eval/accuracy_greedy``) at the first and last evaluation,
the train reward over the last 20 steps, the wall time, and the 1-minute load when the run started.
One seed each: this shows that each option trains, not which is better (seed noise on this demo is
larger than most differences between options).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> the overrides that turn the option on (docs/configuration.md has one row per option).
OPTIONS: dict[str, list[str]] = {
    "grpo": [],
    "sapo": ["algo=sapo"],
    "gmpo": ["algo=gmpo"],
    "gpg": ["algo.objective=gpg"],
    "clip_cov": ["algo.objective=clip_cov"],
    "kl_cov": ["algo.objective=kl_cov"],
    "reinforce_pp": ["algo.advantage=reinforce_pp"],
    "reinforce_pp_baseline": ["algo.advantage=reinforce_pp_baseline"],
    "opo": ["algo.advantage=opo"],
    "passk": ["algo.advantage=passk", "algo.passk_k=4"],
}


def _evals(metrics: Path) -> tuple[list[dict], list[float]]:
    evals, rewards = [], []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "eval/accuracy" in row:
            evals.append(row)
        elif "reward" in row:
            rewards.append(row["reward"])
    return evals, rewards


def run_one(name: str, overrides: list[str], out: Path, steps: int | None) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable,
        "-m",
        "grpo_cli.cli",
        "train",
        "console=plain",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    if steps is not None:
        cmd.append(f"train.steps={steps}")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"name": name, "error": f"rc={proc.returncode}: {tail[0]}"}
    evals, rewards = _evals(run_dir / "metrics.jsonl")
    last = rewards[-20:]
    return {
        "name": name,
        "override": " ".join(overrides) or "(defaults)",
        "sampled": (evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]),
        "greedy": (evals[0]["eval/accuracy_greedy"], evals[-1]["eval/accuracy_greedy"]),
        "reward": sum(last) / max(len(last), 1),
        "wall": wall,
        "load": load,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/options"))
    p.add_argument("--only", nargs="*", choices=list(OPTIONS), help="these options only (default: all)")
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the demo's)")
    p.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to every run, e.g. algo.num_iterations=2"
    )
    args = p.parse_args(argv)
    print("| run | override | held-out sampled, first -> last eval | greedy | train reward, last 20 steps "
          "| wall time | load (1 min) at start |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.only or list(OPTIONS):
        r = run_one(name, [*OPTIONS[name], *args.extra], args.out, args.steps)
        if "error" in r:
            print(f"| {name} | {' '.join(OPTIONS[name])} | {r['error']} | | | | |", flush=True)
            continue
        (s0, s1), (g0, g1) = r["sampled"], r["greedy"]
        print(
            f"| {name} | `{r['override']}` | {s0:.4f} -> {s1:.4f} | {g0:.3f} -> {g1:.3f} | {r['reward']:.3f} "
            f"| {r['wall']:.1f} s | {r['load']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
