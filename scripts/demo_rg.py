"""A run that learns on data no one here wrote: reasoning-gym's chain_sum, on CPU, offline.

    make demo-rg                                          # 3 seeds, ~3.5 min each on 2 cores
    .venv/bin/python scripts/demo_rg.py --seeds 0 --steps 200    # one quick look

``model=tiny-rg`` was warmed up on chain_sum (2-3 single-digit terms, + and -) with noisy labels: right
80% of the time on most problems, but on the "hard" class (``a - b + c``, ``a - b - c``) the
misconception ``a - (b + c)`` 50% of the time and the right answer 30% (grpo_cli/models/tiny_rg.py), so
its greedy answer there is wrong. Per seed: ``grpo train model=tiny-rg data=reasoning_gym ...``, then
``grpo eval`` of the base model and of the trained checkpoint on the held-out split (questions the
warm-up and the training never saw). The table: held-out accuracy sampled (pass@1 at temperature 1) and
greedy, overall and on the hard and easy classes, and the share of hard problems whose greedy answer is
the misconception. Needs the reasoning-gym extra (pip install 'grpo-cli[reasoning-gym]').
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from grpo_cli.models.tiny_rg import DATA_OVERRIDES, is_hard, misconception  # noqa: E402

COMMON = ["model=tiny-rg", *DATA_OVERRIDES, "console=plain"]
TRAIN = [*COMMON, "train.eval_every=0", "train.log_completions_every=0"]
KEYS = [
    "pass@1",
    "greedy",
    "pass@1_hard",
    "greedy_hard",
    "pass@1_easy",
    "greedy_easy",
    "greedy_misconception",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--problems", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--out", type=Path, default=None, help="keep runs and a results.json here")
    return p.parse_args(argv)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate(checkpoint: Path | None, out: Path, seed: int, problems: int) -> dict[str, float]:
    """Sampled and greedy accuracy of one checkpoint, overall and per class."""
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import eval as grpo_eval
    from grpo_cli.data import load_rows

    args = [*COMMON, f"eval.problems={problems}", "eval.samples=4", f"seed={seed}"]
    if checkpoint is not None:
        args.append(f"checkpoint={checkpoint}")
    cfg, _ = compose_config("eval", args)
    if not (out / "eval_completions.jsonl").is_file():  # a rerun with --out reads the evaluations it has
        grpo_eval.run(cfg, str(out), overrides=args)
    rows = {str(r["id"]): r for r in load_rows(cfg.data, "test")}
    records = [json.loads(x) for x in (out / "eval_completions.jsonl").read_text().splitlines()]
    out_m: dict[str, float] = {}
    for cls, keep in (("", lambda r: True), ("_hard", is_hard), ("_easy", lambda r: not is_hard(r))):
        chosen = [x for x in records if keep(rows[x["id"]])]
        out_m[f"pass@1{cls}"] = _mean([float(x["correct"]) for x in chosen if not x["greedy"]])
        out_m[f"greedy{cls}"] = _mean([float(x["correct"]) for x in chosen if x["greedy"]])
    hard_greedy = [x for x in records if x["greedy"] and is_hard(rows[x["id"]])]
    wrong = [str(misconception(rows[x["id"]]["metadata"]["expression"])) for x in hard_greedy]
    out_m["greedy_misconception"] = _mean([float(x["answer"] == w) for x, w in zip(hard_greedy, wrong)])
    out_m["hard_share"] = len(hard_greedy) / max(1, sum(x["greedy"] for x in records))
    return out_m


def run_seed(seed: int, steps: int, problems: int, root: Path) -> dict[str, dict[str, float]]:
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train

    run_dir = root / f"seed{seed}"
    ckpt = run_dir / f"checkpoint-{steps}"
    if not ckpt.is_dir():  # a rerun with --out evaluates the runs it already has
        cfg, _ = compose_config("train", [*TRAIN, f"train.steps={steps}", f"seed={seed}"])
        train.run(cfg, str(run_dir), overrides=[])
    return {
        "base": evaluate(None, run_dir / "eval-base", seed, problems),
        "GRPO": evaluate(ckpt, run_dir / "eval-rl", seed, problems),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="demo-rg-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {seed: run_seed(seed, args.steps, args.problems, root) for seed in args.seeds}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n| seed | model | {' | '.join(KEYS)} |\n| --- | --- |" + " ---: |" * len(KEYS))
    for seed, rows in results.items():
        for name, m in rows.items():
            print(f"| {seed} | {name} | " + " | ".join(f"{m[k]:.3f}" for k in KEYS) + " |")
    for name in next(iter(results.values())):
        means = [statistics.mean(r[name][k] for r in results.values()) for k in KEYS]
        print(f"| mean | {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    share = next(iter(results.values()))["base"]["hard_share"]
    print(f"\nhard problems: {share:.0%} of the held-out set; runs and results.json in {root}")


if __name__ == "__main__":
    main()
