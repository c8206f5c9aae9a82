"""Peak memory and time of `token_logprobs` against the naive full-logits path, forward + backward.

    .venv/bin/python scripts/bench_logprobs.py                            # ~17 min on 2 busy CPU cores
    .venv/bin/python scripts/bench_logprobs.py --tokens 2048 --repeats 1  # issue 23's check, ~2 min
    .venv/bin/python scripts/bench_logprobs.py --head-rows 55,128,256,512,1024,2048  # the head's products, ~2 min

At Qwen2.5-0.5B's dimensions (H = 896, V = 151,936), 4,096 tokens, float32 on CPU. Each path runs
in its own subprocess (this script with --child), one forward + backward per subprocess, so
one path's freed memory cannot hide the other's peak: peak memory is the growth of ru_maxrss
over a baseline taken after the inputs (hidden states, lm_head weight, targets) are allocated;
time is the median over the repeats, the two paths alternating so that load from other
processes on the machine falls on both alike. Two cases: the lm_head weight trained (full
fine-tuning, gradients for hidden and weight) and frozen (LoRA, the default: hidden only).
Targets (issue 2): memory <= 0.25x and time <= 1.3x of the naive path; issue 13: memory <= 0.25x
from 1,024 tokens up, the chunk size chosen from the vocabulary (``default_chunk_size``); issue 23:
at 2,048 tokens with the head frozen, memory <= 0.3x and time <= 1.1x (trained: reported). With the
weight trained, both paths return its [V, H] gradient (545 MB at these shapes), which bounds the
ratio from below at short lengths; the last column leaves it out of both peaks.

``--head-rows`` instead times the head's three products alone, in GFLOP/s, for each number of rows
in a chunk: the logits h W^T [rows, V], the hidden-state gradient dZ W [rows, H], and the weight
gradient dZ^T h summed into [V, H] (as backward does chunk by chunk). It is how
``logprobs.ROW_FLOOR`` was chosen: the rows from which the products run at their throughput.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

CASES = {"trained": True, "frozen": False}  # case -> does the lm_head weight need a gradient


def _naive(hidden, weight, targets, chunk_size):
    import torch

    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _ours(hidden, weight, targets, chunk_size):
    from grpo_cli.core.logprobs import token_logprobs

    return token_logprobs(hidden, weight, targets, chunk_size=chunk_size or None)


PATHS = {"naive": _naive, "chunked": _ours}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> None:
    """One path, one case, one forward + backward: print {"peak_mb", "seconds"} as JSON."""
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden)
    weight = torch.randn(args.vocab, args.hidden).mul_(args.hidden**-0.5)  # in place: no temporary copy
    targets = torch.randint(0, args.vocab, (1, args.tokens))
    hidden.requires_grad_(True)
    weight.requires_grad_(CASES[args.case])
    fn = PATHS[args.path]
    # Load the kernels on a toy case, small enough not to raise the baseline's high-water mark.
    toy = torch.randn(64, args.hidden, requires_grad=CASES[args.case])
    fn(hidden[:, :8], toy, targets[:, :8] % 64, args.chunk_size).sum().backward()
    hidden.grad = None
    baseline = _peak_mb()
    start = time.perf_counter()
    fn(hidden, weight, targets, args.chunk_size).sum().backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mb": _peak_mb() - baseline, "seconds": seconds}))


def head_throughput(args: argparse.Namespace) -> None:
    """Print GFLOP/s of the head's three products for each row count in --head-rows."""
    import torch

    torch.manual_seed(0)
    vocab, hidden = args.vocab, args.hidden
    weight = torch.randn(vocab, hidden).mul_(hidden**-0.5)  # [V, H]
    grad_w = torch.zeros(vocab, hidden)  # [V, H], summed into as backward does
    runs = max(3, args.repeats)
    print(
        f"head products, GFLOP/s (median of {runs} after a warm-up): H={hidden}, V={vocab}, float32, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| rows | logits h W^T | grad_h dZ W | grad_W += dZ^T h |")
    print("| ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.head_rows.split(",")):
        h = torch.randn(rows, hidden)
        z, dh = torch.empty(rows, vocab), torch.empty(rows, hidden)  # reused: no page faults timed
        products = (  # (function, args, kwargs): logits, grad_h, grad_W
            (torch.mm, (h, weight.t()), {"out": z}),
            (torch.mm, (z, weight), {"out": dh}),
            (grad_w.addmm_, (z.t(), h), {}),
        )
        flops = 2 * rows * vocab * hidden
        cells = [f"{flops / _median_seconds(fn, a, kw, runs) / 1e9:.0f}" for fn, a, kw in products]
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


def _median_seconds(fn, args: tuple, kwargs: dict, runs: int) -> float:
    fn(*args, **kwargs)  # warm-up: kernels chosen, pages touched
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def parent(args: argparse.Namespace) -> None:
    from grpo_cli.core.logprobs import default_chunk_size

    chunk = args.chunk_size or default_chunk_size(args.vocab)
    print(
        f"token_logprobs vs naive, forward + backward: {args.tokens} tokens, H={args.hidden}, "
        f"V={args.vocab}, float32, CPU ({args.repeats} repeats, median), chunk_size={chunk}"
        f"{'' if args.chunk_size else ' (default_chunk_size)'}\n"
    )
    print(
        "| lm_head | path    | peak extra MB | time s (median) | runs s             | memory ours/naive | time ours/naive "
        "| memory ours/naive, weight grad left out |"
    )
    print(
        "| ------- | ------- | ------------: | --------------: | ------------------ | ----------------: | --------------: "
        "| --------------------------------------: |"
    )
    for case in CASES:
        runs = {path: [] for path in PATHS}
        for repeat in range(args.repeats):
            for path in list(PATHS)[:: 1 if repeat % 2 == 0 else -1]:
                runs[path].append(_run_child(args, path, case))
        results = {path: _median(r) for path, r in runs.items()}
        naive, ours = results["naive"], results["chunked"]
        for path, r in results.items():
            times = " ".join(f"{run['seconds']:.1f}" for run in runs[path])
            ratios = "-", "-", "-"
            if path == "chunked":
                grad_w = args.vocab * args.hidden * 4 / 2**20 if CASES[case] else 0.0  # MiB, as ru_maxrss
                ratios = (
                    f"{ours['peak_mb'] / naive['peak_mb']:.3f}x",
                    f"{ours['seconds'] / naive['seconds']:.2f}x",
                    f"{(ours['peak_mb'] - grad_w) / (naive['peak_mb'] - grad_w):.3f}x",
                )
            cells = [case, path, f"{r['peak_mb']:.0f}", f"{r['seconds']:.1f}", times, *ratios]
            print("| " + " | ".join(cells) + " |", flush=True)


def _run_child(args: argparse.Namespace, path: str, case: str) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", "--path", path, "--case", case]
    for name in ("tokens", "hidden", "vocab", "chunk_size"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=896)  # Qwen2.5-0.5B
    parser.add_argument("--vocab", type=int, default=151936)  # Qwen2.5 tokenizer
    parser.add_argument("--chunk-size", type=int, default=0, help="rows per chunk (0: default_chunk_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head-rows", help="comma-separated rows: time the head's products alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.head_rows:
        head_throughput(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
