"""What a checkpoint's manifest costs: save with and without it, verify, load, on a real-shape model.

    python scripts/make_standin.py --out /tmp/qwen-standin-2l --layers 2      # once (35-55 s)
    python scripts/bench_checkpoint.py --model /tmp/qwen-standin-2l [--dtype float32] [--repeat 3]

The checkpoint is the one ``grpo train model=qwen lora=none`` writes (full fine-tuning): the model
loaded by ``load_policy``, its AdamW (``make_optimizer``) after one step, so both moments exist, and
``checkpoint.save``. Printed, median of ``--repeat`` runs, wall and CPU seconds (all threads):

- ``save, no manifest``: the save as it was before manifests (the same files, torch.save to a path);
- ``save, manifest``: ``checkpoint.save`` (trainer_state.pt and config.yaml hashed while written, the
  weights and tokenizer read back once for their SHA-256, the manifest);
- ``hash all, second pass``: after the old save, a manifest hashed by reading every file back: what
  the manifest would add to the old save without hashing while writing;
- ``verify (resume)``: ``manifest.verify`` with the trainer state needed, what ``train.resume`` pays;
- ``load (resume)``: ``torch.load`` of trainer_state.pt plus ``from_pretrained`` of the weights, what
  a resume reads anyway, for scale.

The files were just written, so reads come from the page cache: verification is measured as CPU work
(SHA-256), not disk. Writes go to ``--out`` (default: a temporary directory, removed at the end).
Prints ``uptime`` and the CPU model with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grpo_cli.cli import compose_config
from grpo_cli.commands.update import make_optimizer, trained_params
from grpo_cli.models import identity, load_policy
from grpo_cli.run import checkpoint, manifest
from grpo_cli.runtime import rng


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the stand-in (scripts/make_standin.py)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model.dtype")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="where the checkpoints go (default: a temporary dir)")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """The policy, a trainer state with both AdamW moments filled, the run config."""
    overrides = ["model=qwen", f"model.name_or_path={args.model}", "lora=none", f"model.dtype={args.dtype}"]
    cfg, _ = compose_config("train", overrides)
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    optimizer, scheduler = make_optimizer(policy, cfg.train)
    for p in trained_params(optimizer):
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler.step()
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "prompt_order": {"pos": 8},
    }
    from omegaconf import OmegaConf

    return policy, state, OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_without_manifest(run: Path, step: int, policy: Any, state: dict[str, Any], config_yaml: str) -> Path:
    """The save before manifests: the same files, written to a temporary directory, renamed into place."""
    final = run / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=run))
    policy.model.save_pretrained(tmp)
    identity.record_base(tmp, policy.model)
    policy.tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng.rng_state()}, tmp / checkpoint.STATE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    checkpoint.publish(tmp, final)
    return final


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure(args: argparse.Namespace, run: Path) -> tuple[dict[str, list[tuple[float, float]]], Path]:
    from transformers import AutoModelForCausalLM

    policy, state, config_yaml = build(args)
    times: dict[str, list[tuple[float, float]]] = {}
    newest = run

    def note(name: str, fn: Callable[..., Any], *fn_args: Any, **kwargs: Any) -> Any:
        wall, cpu, out = timed(lambda: fn(*fn_args, **kwargs))
        times.setdefault(name, []).append((wall, cpu))
        return out

    def load(ckpt: Path) -> Any:
        return checkpoint.load_state(ckpt), AutoModelForCausalLM.from_pretrained(ckpt)

    model, tok = policy.model, policy.tokenizer
    for r in range(args.repeat):
        for old in checkpoint.checkpoint_dirs(run):  # the last repeat's stay, for the file listing
            shutil.rmtree(old)
        note("save, no manifest", save_without_manifest, run, 10 * r + 1, policy, state, config_yaml)
        newest = note(
            "save, manifest",
            checkpoint.save,
            run,
            10 * r + 2,
            checkpoint.Saved(model, tok, state, config_yaml),
            0,
        )
        plain = save_without_manifest(run, 10 * r + 3, policy, state, config_yaml)
        note("hash all, second pass", manifest.write, plain, 10 * r + 3)
        verdict = note("verify (resume)", manifest.verify, newest, need=[checkpoint.STATE_FILE])
        assert verdict.whole and verdict.verified, verdict
        note("load (resume)", load, newest)
    return times, newest


def report(times: dict[str, list[tuple[float, float]]], ckpt: Path, args: argparse.Namespace) -> None:
    files = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())}
    total = sum(files.values())
    print(
        f"checkpoint: {total / 2**30:.2f} GiB in {len(files)} files (model.dtype={args.dtype}, full fine-tuning)"
    )
    for name, size in sorted(files.items(), key=lambda kv: -kv[1])[:3]:
        print(f"  {name:<24} {size / 2**20:9.1f} MiB")
    base = statistics.median(w for w, _ in times["save, no manifest"])
    print(
        f"{'operation':<28} {'wall s':>8} {'CPU s':>8} {'GiB/s':>7} {'vs old save':>12}   (median of {args.repeat})"
    )
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"{name:<28} {wall:8.2f} {cpu:8.2f} {total / 2**30 / wall:7.2f} {wall / base:11.2f}x")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?"
    )
    print(
        f"cpu: {model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); {platform.python_version()}"
    )
    print(f"uptime: {uptime}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = args.out or Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    run.mkdir(parents=True, exist_ok=True)
    try:
        times, newest = measure(args, run)
        report(times, newest, args)
    finally:
        if args.out is None:
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
