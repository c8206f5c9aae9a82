"""One prepared command for the day a GPU is lent: does the real-model path work there, and how fast?

    make gpu-check                                  # same as: python scripts/gpu_check.py
    python scripts/gpu_check.py --layers 4          # a 4-layer stand-in instead of the full 24 layers

Checks, each timed, then one table (check, result, seconds, peak GPU memory, tokens/s):
1. the tests marked ``cuda`` (``pytest -m cuda``);
2. a 24-layer Qwen2.5-0.5B-Instruct stand-in (scripts/make_standin.py), built in a temp directory;
3. ``grpo train model=qwen`` on it: bf16 weights, LoRA, 2 steps of 4 prompts x 8 completions of up to
   128 tokens, GSM8K prompts (``../shared/data`` when present, else generated problems);
4. ``grpo eval`` of that checkpoint: 32 problems x (4 samples + greedy);
5. the vLLM engine tests (``pytest -k vllm``) and the server engine's (``tests/engines/server``) when
   vllm is installed;
6. the server path on the one GPU: ``grpo serve`` of the stand-in (a third of the GPU's memory) and
   ``grpo train rollout.engine=vllm-server rollout.max_staleness=1`` against it, 3 steps, weights
   synced every step (over gloo through host memory: no NCCL group yet), its logprob_diff noted.
About 7 minutes on one recent GPU (most of it the stand-in build and model loads); at most 10. Exit
status 1 when a check fails. Without a CUDA device it prints one line saying so and exits 0.
The stand-in's weights are random: the numbers are speed and memory, never accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    check: str
    ok: bool | None  # None: not run (e.g. vllm absent)
    seconds: float = 0.0
    peak_gib: float | None = None
    tokens_per_s: float | None = None
    note: str = ""


def _pytest(args: list[str], name: str, timeout: int) -> Row:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    summary = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode == 5:  # nothing collected
        return Row(name, None, time.perf_counter() - t0, note="no such tests")
    return Row(name, out.returncode == 0, time.perf_counter() - t0, note=re.sub(r"=+", "", summary).strip())


def _gsm8k_dir(tmp: Path) -> Path:
    """GSM8K from ../shared/data, else a generated file in its format (arithmetic word problems)."""
    shared = REPO.parent / "shared" / "data" / "gsm8k"
    if (shared / "test.jsonl").is_file():
        return shared
    from grpo_cli.config import DataConfig
    from grpo_cli.data import arithmetic

    out = tmp / "gsm8k"
    out.mkdir()
    for split in ("train", "test"):
        rows = arithmetic.load(DataConfig(), split)[:200]
        text = "".join(
            json.dumps(
                {"question": f"Tom says: {r['question']}. What is it?", "answer": f"#### {r['answer']}"}
            )
            + "\n"
            for r in rows
        )
        (out / f"{split}.jsonl").write_text(text)
    return out


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _train(
    standin: Path, data: Path, run_dir: Path, prompts: int = 4, group: int = 8, tokens: int = 128
) -> Row:
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train
    from grpo_cli.commands.validate import validate
    from grpo_cli.run.runlog import read_metrics

    args = [
        "model=qwen",
        f"model.name_or_path={standin}",
        "model.dtype=bfloat16",
        "data=gsm8k",
        f"data.path={data}",
        "train.steps=2",
        f"train.prompts_per_step={prompts}",
        f"algo.group_size={group}",
        f"rollout.max_new_tokens={tokens}",
        "train.eval_every=0",
        "console=plain",
    ]
    cfg, _ = compose_config("train", args)
    validate(cfg)
    _reset_peak()
    t0 = time.perf_counter()
    train.run(cfg, str(run_dir), overrides=args)
    seconds = time.perf_counter() - t0
    last = read_metrics(run_dir)[-1]
    note = f"step {last['step_time']:.1f} s (generation {last['gen_time']:.1f} s), loss {last['loss']:.3g}"
    what = f"train: bf16, LoRA, 2 steps x {prompts * group} completions"
    return Row(what, True, seconds, _peak_gib(), last["tokens_per_s"], note)


def _eval(standin: Path, data: Path, checkpoint: Path, out: Path, problems: int = 32) -> Row:
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import eval as evaluate
    from grpo_cli.commands.validate import validate

    args = [
        f"checkpoint={checkpoint}",
        f"model.name_or_path={standin}",
        "model.dtype=bfloat16",
        "data=gsm8k",
        f"data.path={data}",
        f"eval.problems={problems}",
        "eval.samples=4",
        "eval.k=[1,4]",
        "eval.bootstrap=100",
        "console=plain",
    ]
    cfg, _ = compose_config("eval", args)
    validate(cfg)
    _reset_peak()
    t0 = time.perf_counter()
    evaluate.run(cfg, str(out), overrides=args)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "eval_completions.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] or 0 for r in records)
    note = f"{len(records)} completions, {cfg.rollout.max_new_tokens} tokens max (the checkpoint's)"
    return Row(
        f"eval: {problems} problems x (4 + greedy)", True, seconds, _peak_gib(), tokens / seconds, note
    )


def _server_train(standin: Path, data: Path, run_dir: Path, port: int = 8765) -> Row:
    """``grpo serve`` on this GPU beside the trainer, and 3 steps of training against it at S = 1."""
    import signal
    import urllib.request

    from grpo_cli.run.runlog import read_metrics

    log = (run_dir.parent / "server.log").open("w")
    cmd = [sys.executable, "-m", "grpo_cli", "serve", "--model", str(standin), "--port", str(port),
           "--dtype", "bfloat16", "--", "--gpu-memory-utilization", "0.3", "--max-model-len", "2048"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - t0 > 240:
                    raise RuntimeError(f"grpo serve did not come up; see {log.name}") from None
                time.sleep(2)
        args = [
            "model=qwen", f"model.name_or_path={standin}", "model.dtype=bfloat16", "data=gsm8k",
            f"data.path={data}", "train.steps=3", "train.prompts_per_step=4", "algo.group_size=8",
            "rollout.max_new_tokens=128", "train.eval_every=0", "console=plain", "rollout.engine=vllm-server",
            f"rollout.servers=[http://127.0.0.1:{port}]", "rollout.max_staleness=1", "algo.engine_is.cap=2.0",
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        _reset_peak()
        out = subprocess.run([sys.executable, "-m", "grpo_cli", "train", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        if out.returncode:
            raise RuntimeError(out.stdout[-300:] + out.stderr[-300:])
        rows = read_metrics(run_dir)
        last = rows[-1]
        diffs = [r["rollout/logprob_diff"] for r in rows if "rollout/logprob_diff" in r]
        note = (f"step {last['step_time']:.1f} s, idle {last.get('idle_time', 0):.1f} s, logprob_diff "
                f"step 1 {diffs[0]:.2g} (on-policy), then up to {max(diffs[1:]):.2g} (1 step stale)")  # fmt: skip
        return Row("server: grpo serve + train at S=1, 3 steps", True, time.perf_counter() - t0,
                   None, last["tokens_per_s"], note)  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()


def _standin(out: Path, layers: int) -> Row:
    from grpo_cli.models.standin import build_standin

    t0 = time.perf_counter()
    build_standin(out, layers=layers, data_dir=REPO.parent / "shared" / "data")
    return Row(f"stand-in: Qwen2.5-0.5B-Instruct, {layers} layers", True, time.perf_counter() - t0)


def _guarded(name: str, fn, *args) -> Row:
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failed check is a row of the table, not the end
        traceback.print_exc()
        return Row(name, False, time.perf_counter() - t0, note=f"{type(exc).__name__}: {str(exc)[:120]}")


def _table(rows: list[Row], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("check", "left"), ("result", "left"), ("s", "right"), ("peak GPU GiB", "right")):
        table.add_column(col, justify=justify)
    table.add_column("tokens/s", justify="right")
    table.add_column("note", overflow="fold")
    for r in rows:
        result = "[green]ok[/]" if r.ok else "[red]FAILED[/]" if r.ok is False else "[dim]skipped[/]"
        table.add_row(
            r.check,
            result,
            f"{r.seconds:.0f}",
            "-" if r.peak_gib is None else f"{r.peak_gib:.2f}",
            "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
            r.note,
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="layers of the stand-in (24: the real count)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}); nothing to check")
        return 0
    from rich.console import Console

    device = torch.cuda.get_device_name(0)
    rows = [_pytest(["-m", "cuda", "tests"], "tests marked cuda", 300)]
    with tempfile.TemporaryDirectory(prefix="grpo-gpu-check-") as tmp:
        tmp = Path(tmp)
        built = _guarded("stand-in", _standin, tmp / "standin", args.layers)
        rows.append(built)
        if built.ok is False:
            Console().print(_table(rows, f"grpo-cli gpu-check on {device} (torch {torch.__version__})"))
            return 1
        standin, data = tmp / "standin", _gsm8k_dir(tmp)
        rows.append(_guarded("train", _train, standin, data, tmp / "run"))
        ckpt = tmp / "run" / "checkpoint-2"
        if ckpt.is_dir():
            rows.append(_guarded("eval", _eval, standin, data, ckpt, tmp / "eval"))
        else:
            rows.append(Row("eval", None, note="no checkpoint from the train check"))
        if importlib.util.find_spec("vllm") is not None:
            rows.append(_guarded("server", _server_train, standin, data, tmp / "server-run"))
    if importlib.util.find_spec("vllm") is not None:
        rows.append(_pytest(["-k", "vllm", "tests"], "vLLM engine tests", 300))
        rows.append(_pytest(["tests/engines/server"], "vLLM server engine tests", 300))
    else:
        rows.append(Row("vLLM engine tests", None, note="vllm not installed"))
    Console().print(_table(rows, f"grpo-cli gpu-check on {device} (torch {torch.__version__})"))
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
