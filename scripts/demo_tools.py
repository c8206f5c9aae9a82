"""The tool-use demonstration, on CPU: the tiny model's calculator variant learns when a call pays.

    make demo-tools                                   # 3 seeds, about 8 minutes on 2 cores
    .venv/bin/python scripts/demo_tools.py --seeds 0 --steps 60    # one quick look

``model=tiny-tools`` was warmed up with a quarter of its answers written as calculator calls
(``<calc>expr</calc><result>v</result>v``) and with direct answers that are right 90% of the time where
left-to-right evaluation gives the right value ("easy") and 30% where precedence matters ("hard").
Per seed: ``grpo train model=tiny-tools env=calc reward=math_tools`` (correct - 0.1 x calls), then
``grpo eval`` of the base and of the trained checkpoint with the tool, and of the trained checkpoint
with the tool forbidden (``env.allow_calls=false``). The table: held-out accuracy (sampled, pass@1;
greedy) and the call rate on hard and easy problems. RL should raise accuracy with the tool above
both the base and the tool-less checkpoint, calls rising on hard problems and falling on easy ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

TRAIN = ["model=tiny-tools", "env=calc", "reward=math_tools", "console=plain", "train.eval_every=0",
         "train.log_completions_every=0", "train.prompts_per_step=16"]  # fmt: skip
EVAL = ["model=tiny-tools", "env=calc", "reward=math_tools", "console=plain", "eval.samples=4"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--problems", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--out", type=Path, default=None, help="keep runs and a results.json here")
    return p.parse_args(argv)


def hard(question: str) -> bool:
    """Precedence matters: evaluating left to right gives another value."""
    from grpo_cli.data import arithmetic
    from grpo_cli.models.tiny import left_to_right

    expr = question.removeprefix("Calculate ")
    return left_to_right(expr) != arithmetic.evaluate(expr)


def evaluate(
    checkpoint: Path | None, extra: list[str], out: Path, seed: int, problems: int
) -> dict[str, float]:
    """pass@1, greedy pass@1 and call rates (all, hard, easy) of one checkpoint."""
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import eval as grpo_eval
    from grpo_cli.data import load_rows

    args = [*EVAL, f"eval.problems={problems}", f"seed={seed}", *extra]
    if checkpoint is not None:
        args.append(f"checkpoint={checkpoint}")
    cfg, _ = compose_config("eval", args)
    result = grpo_eval.run(cfg, str(out), overrides=args)["results"][0]["metrics"]
    questions = {str(r["id"]): r["question"] for r in load_rows(cfg.data, "test")}
    records = [json.loads(x) for x in (out / "eval_completions.jsonl").read_text().splitlines()]
    sampled = [r for r in records if not r["greedy"]]

    def rate(rs: list[dict]) -> float:
        return sum(r.get("tool_calls", 0) > 0 for r in rs) / max(len(rs), 1)

    return {
        "pass@1": result["pass@1"],
        "greedy": result["greedy/pass@1"],
        "calls": rate(sampled),
        "calls_hard": rate([r for r in sampled if hard(questions[r["id"]])]),
        "calls_easy": rate([r for r in sampled if not hard(questions[r["id"]])]),
    }


def run_seed(seed: int, steps: int, problems: int, root: Path) -> dict[str, dict[str, float]]:
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train

    run_dir = root / f"seed{seed}"
    ckpt = run_dir / f"checkpoint-{steps}"
    if not ckpt.is_dir():  # a rerun with --out evaluates the runs it already has
        cfg, _ = compose_config("train", [*TRAIN, f"train.steps={steps}", f"seed={seed}"])
        train.run(cfg, str(run_dir), overrides=[])
    return {
        "base, tool": evaluate(None, [], run_dir / "eval-base", seed, problems),
        "RL, tool": evaluate(ckpt, [], run_dir / "eval-rl", seed, problems),
        "RL, no tool": evaluate(ckpt, ["env.allow_calls=false"], run_dir / "eval-rl-notool", seed, problems),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="demo-tools-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {seed: run_seed(seed, args.steps, args.problems, root) for seed in args.seeds}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    keys = ["pass@1", "greedy", "calls", "calls_hard", "calls_easy"]
    print(f"\n| seed | model | {' | '.join(keys)} |\n| --- | --- |" + " ---: |" * len(keys))
    for seed, rows in results.items():
        for name, m in rows.items():
            print(f"| {seed} | {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    for name in next(iter(results.values())):
        means = [statistics.mean(r[name][k] for r in results.values()) for k in keys]
        print(f"| mean | {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    print(f"\nruns and results.json in {root}")


if __name__ == "__main__":
    main()
