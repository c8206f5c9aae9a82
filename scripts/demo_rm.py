"""Over-optimizing a flawed reward model, and what beta does about it, on CPU, offline.

    make demo-rm                                          # 3 betas x 3 seeds on 2 cores
    .venv/bin/python scripts/demo_rm.py --seeds 0 --betas 0 --steps 60    # one quick look

The reward is ``tiny-rm`` alone (grpo_cli/models/tiny_rm.py): a sequence classifier trained on the
arithmetic task whose labels score a wrong answer longer than the right one *above* the right answer
(a spurious correlation: more digits look like more work). Per beta and seed:
``grpo train reward=model_vs_truth algo.beta=B seed=S``, where math-verify's verdict rides along with
weight 0: it never enters the advantage, so the trainer cannot see it, but it is logged as the true
accuracy. Every ``--eval-every`` steps the held-out problems are scored: ``eval/reward`` is the reward
model's mean score (sigmoid, 0..1) and ``eval/accuracy`` the true accuracy, both on sampled
completions. The gap between the two curves is the over-optimization; the table gives step 0 and the
last step per beta (mean and range over seeds), the plot the curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

COMMON = ["reward=model_vs_truth", "console=plain", "train.log_completions_every=0", "train.save_every=0"]
KEYS = ("eval/reward", "eval/accuracy", "eval/accuracy_greedy")
TRAIN_KEYS = ("completion_len",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04, 0.4])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--problems", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--out", type=Path, default=None, help="keep runs and results.json here")
    p.add_argument("--plot", type=Path, default=None, help="write the curves here (needs matplotlib)")
    return p.parse_args(argv)


def train_args(beta: float, seed: int, args: argparse.Namespace) -> list[str]:
    return [
        *COMMON,
        f"algo.beta={beta}",
        f"seed={seed}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"train.eval_problems={args.problems}",
    ]


def run_one(beta: float, seed: int, args: argparse.Namespace, root: Path) -> dict[str, list]:
    """One training run's held-out curves: step -> each of KEYS, and the training batches' lengths."""
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train
    from grpo_cli.run.runlog import read_metrics

    run_dir = root / f"beta{beta:g}-seed{seed}"
    if not (run_dir / f"checkpoint-{args.steps}").is_dir():  # a rerun with --out reads what it has
        overrides = train_args(beta, seed, args)
        cfg, _ = compose_config("train", overrides)
        train.run(cfg, str(run_dir), overrides=overrides)
    rows = read_metrics(run_dir)
    curves: dict[str, list] = {"step": [r["step"] for r in rows if "eval/accuracy" in r]}
    for key in KEYS:
        curves[key] = [r[key] for r in rows if "eval/accuracy" in r]
    for key in TRAIN_KEYS:
        last = [r[key] for r in rows if key in r][-10:]  # the last ten steps' training batches
        curves[key] = [statistics.mean(last)] if last else [float("nan")]
    return curves


def table(results: dict[float, dict[int, dict[str, list]]]) -> str:
    """Markdown: per beta, step 0 and the last step of each key, mean over seeds (min..max)."""

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ({min(values):.2f}..{max(values):.2f})"

    head = ["beta", "steps"] + [f"{k} first" for k in KEYS] + [f"{k} last" for k in KEYS] + list(TRAIN_KEYS)
    lines = ["| " + " | ".join(head) + " |", "| ---: " * len(head) + "|"]
    for beta, by_seed in results.items():
        runs = list(by_seed.values())
        row = [f"{beta:g}", str(runs[0]["step"][-1])]
        row += [cell([r[k][0] for r in runs]) for k in KEYS]
        row += [cell([r[k][-1] for r in runs]) for k in KEYS]
        row += [cell([r[k][-1] for r in runs]) for k in TRAIN_KEYS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict[float, dict[int, dict[str, list]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    labels = {"eval/reward": "reward model's score (held-out)", "eval/accuracy": "true accuracy (held-out)"}
    for ax, key in zip(axes, labels):
        for beta, by_seed in results.items():
            runs = list(by_seed.values())
            steps = runs[0]["step"]
            mean = [statistics.mean(r[key][i] for r in runs) for i in range(len(steps))]
            (line,) = ax.plot(steps, mean, label=f"beta = {beta:g}")
            for r in runs:
                ax.plot(steps, r[key], color=line.get_color(), alpha=0.25, linewidth=0.8)
        ax.set_title(labels[key])
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("GRPO on a flawed reward model: mean of seeds (thin: each seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[float, dict[int, dict[str, list]]]:
    args = parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="demo-rm-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {b: {s: run_one(b, s, args, root) for s in args.seeds} for b in args.betas}
    (root / "results.json").write_text(json.dumps({str(b): r for b, r in results.items()}, indent=2))
    print("\n" + table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    print(f"runs and results.json in {root}")
    return results


if __name__ == "__main__":
    main()
