"""Step time with rollouts generated ahead (rollout.max_staleness=1) against strictly alternating
generation and update (max_staleness=0), on one vLLM server, measured side by side in one run.

    python scripts/bench_async.py                                  # the tiny model, ~3 min on 2 cores
    python scripts/bench_async.py --model-dir /tmp/qwen-standin-4l --steps 6 --warmup 2   # real widths

The server (`grpo serve`) is pinned to core 0 (taskset, VLLM_CPU_OMP_THREADS_BIND=0) and each
`grpo train` to core 1 with one thread, so generation and the update each have a core: the layout
this knob is for (generation on devices of its own). Both runs use the same server, the same seed
and the same settings; for each S the script reads metrics.jsonl and prints the mean step time over
the steps after --warmup, the generation time, the trainer's idle time (waiting for generation) and
the ratio S=1 / S=0 (the issue's goal: <= 0.75). --repeats alternates the two runs that many times.
The tiny model runs the default demo's batch (16 prompts x 8, 16 tokens); a --model-dir (a stand-in
from scripts/make_standin.py) runs 4 prompts x 4 completions of 64 tokens with LoRA.

    python scripts/bench_async.py --learn                          # learning, ~30 min on 2 cores

--learn runs the default demo whole (300 steps, held-out evaluation at both ends) on the hf engine
and on the server at S = 0, 1 and 2 (--staleness), one after another with the same seed, and prints
each run's held-out accuracy before and after, its gain over the hf run's, and the gain's noise: two
standard errors of the difference of two held-out accuracies (binomial, problems x samples each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="a model directory (default: the tiny model)")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the means")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--learn", action="store_true", help="learning at equal steps instead of step time")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2], help="--learn: the S values")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    return p.parse_args(argv)


def _pin(cores: str) -> list[str]:
    return ["taskset", "-c", cores] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0"}
    cmd = [*_pin("0"), sys.executable, "-m", "grpo_cli", "serve", "--model", model, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited; its log: {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    sys.exit("the server did not come up in 10 minutes")


def grpo_train(overrides: list[str], run_dir: Path) -> list[dict[str, float]]:
    """``grpo train`` on core 1 with one thread; its metrics.jsonl rows."""
    cmd = [*_pin("1"), sys.executable, "-m", "grpo_cli", "train", "console=plain", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([*cmd, *overrides], env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"grpo train failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(url: str, staleness: int, args: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    shape = (
        ["model=qwen", f"model.name_or_path={args.model_dir}", "model.dtype=float32", "train.prompts_per_step=4",
         "algo.group_size=4", "rollout.max_new_tokens=64", "algo.beta=0.0"]
        if args.model_dir else []
    )  # fmt: skip
    overrides = [
        "rollout.engine=vllm-server", f"rollout.servers=[{url}]", f"rollout.max_staleness={staleness}",
        f"train.steps={args.steps}", "train.eval_every=0", "train.eval_at_ends=false", "train.save_every=0",
        *shape, *args.overrides,
    ]  # fmt: skip
    rows = grpo_train(overrides, run_dir)
    timed = [r for r in rows if r.get("step", 0) > args.warmup and "step_time" in r]
    mean = {k: statistics.mean(r.get(k, 0.0) for r in timed) for k in ("step_time", "gen_time", "idle_time")}
    return mean


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(f"CPU: {cpu}; load at start {load}; cores {os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="bench-async-"))
    server = start_server(args.model_dir or "tiny", args.port, work / "server.log")
    url = f"http://127.0.0.1:{args.port}"
    if args.learn:
        try:
            learn(url, args, work)
        finally:
            server.terminate()
            server.wait(60)
        return
    results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    try:
        for rep in range(args.repeats):
            for s in (0, 1):
                results[s].append(train(url, s, args, work / f"s{s}-{rep}"))
    finally:
        server.terminate()
        server.wait(60)
    print(f"\n{'S':>3} {'s/step':>8} {'gen s':>8} {'idle s':>8}")
    means = {}
    for s, runs in results.items():
        means[s] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        m = means[s]
        print(f"{s:>3} {m['step_time']:>8.3f} {m['gen_time']:>8.3f} {m['idle_time']:>8.3f}")
    print(f"\nstep time S=1 / S=0: {means[1]['step_time'] / means[0]['step_time']:.2f} (goal <= 0.75)")
    with open("/proc/loadavg") as f:
        print(f"load at end {f.read().split()[0]}")
    shutil.rmtree(work, ignore_errors=True)


def held_out(rows: list[dict[str, float]]) -> tuple[float, float, float, float]:
    """Held-out (sampled before, sampled after, greedy before, greedy after) of a run's metrics."""
    evals = [r for r in rows if "eval/accuracy" in r]
    first, last = evals[0], evals[-1]
    return (first["eval/accuracy"], last["eval/accuracy"], first["eval/accuracy_greedy"],
            last["eval/accuracy_greedy"])  # fmt: skip


def learn(url: str, args: argparse.Namespace, work: Path) -> None:
    """The default demo on hf and on the server at each S; held-out accuracy and its noise."""
    common = ["train.eval_every=0", "train.eval_at_ends=true", *args.overrides]
    runs = {"hf": grpo_train(common, work / "hf")}
    for s in args.staleness:
        server = ["rollout.engine=vllm-server", f"rollout.servers=[{url}]", f"rollout.max_staleness={s}"]
        runs[f"server S={s}"] = grpo_train([*server, *common], work / f"learn-s{s}")
    n = 200 * 4  # train.eval_problems x train.eval_samples (the defaults)
    base = held_out(runs["hf"])
    print(
        f"\n{'run':<12} {'sampled':>15} {'greedy':>15} {'gain - hf':>10} {'2 SE':>6} {'max lag':>8} {'dropped':>8}"
    )
    for name, rows in runs.items():
        s0, s1, g0, g1 = held_out(rows)
        noise = 2 * ((s1 * (1 - s1) + base[1] * (1 - base[1])) / n) ** 0.5
        lag = max((r.get("staleness", 0.0) for r in rows), default=0.0)
        dropped = sum(r.get("dropped_groups", 0.0) for r in rows)
        print(f"{name:<12} {s0:>6.3f} -> {s1:.3f} {g0:>6.3f} -> {g1:.3f} {(s1 - s0) - (base[1] - base[0]):>+10.3f} "
              f"{noise:>6.3f} {lag:>8.0f} {dropped:>8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
