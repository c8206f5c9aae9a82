"""Decode speed at real shapes against the memory floor: ``sample_group`` on Qwen2.5-0.5B's dimensions.

    .venv/bin/python scripts/bench_decode.py                          # fp32 and bf16, ~3 min on 2 busy cores
    .venv/bin/python scripts/bench_decode.py --dtypes float32 --repeats 1   # a quick look

A randomly initialised Qwen2 with Qwen2.5-0.5B's dimensions (hidden 896, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings) and ``--layers`` layers (4 by default: 196 M
parameters) samples G completions of ``--prompts`` random prompts, ``--new-tokens`` tokens each, EOS
never drawn, temperature 1, seeded per-prompt streams (what ``grpo train`` runs; ``--unseeded`` for
the global-RNG path of ``grpo sample`` / ``grpo eval``).

The memory floor: each of the ``--new-tokens`` forward passes (the prefill and every decode step)
reads every weight once, so no run can take less than new_tokens x weight bytes / bandwidth, where
the bandwidth is this machine's, measured here as a 256 MB ``torch.sum`` with the default threads.
The compute floor: each step also does 2 x rows x parameters FLOPs, at best at the rate the same
dtype's matrix product reaches with many rows (``matmul_gflops``: 512 rows by a [32768, 896]
weight). On a few cores the second can be the higher: 16 rows of float32 are 8 FLOPs per weight
byte, more than 2 cores do at 30-50 GB/s. Our time includes the prefill and the sampling; the
``draw`` column is the sampling's share (temperature, softmax, the inverse-CDF lookup). Paths alternate over ``--repeats`` rounds after a
warm-up: ours as shipped (oneDNN linears, large weights packed: ``grpo_cli.engines.hf.onednn``),
ours with oneDNN on the unpacked weights, and ours with the default kernels behind ``F.linear``
(MKL for float32). The machine is shared: read the medians, and the ratio, not the
seconds. Also prints, on paper, the weights read per step and the floor for the full 24 layers.
Target (issue 13): ours within 1.5x of the floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

NEVER = -1  # an EOS id no sampled token can equal: every row decodes all its tokens
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151_936,
    "num_hidden_layers": 24,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen2.5-0.5B has 24)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=2, help="distinct prompts per call")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--unseeded", action="store_true", help="sample from the global RNG, as grpo sample does")
    return p.parse_args(argv)


def build_model(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **{**QWEN25_05B, "num_hidden_layers": layers},
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one forward pass reads: every parameter once (a tied head and embedding count once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def paper_bytes(layers: int, itemsize: int) -> int:
    """Weight bytes of Qwen2.5-0.5B with ``layers`` layers, from its dimensions alone."""
    h, i, v = QWEN25_05B["hidden_size"], QWEN25_05B["intermediate_size"], QWEN25_05B["vocab_size"]
    kv = h // QWEN25_05B["num_attention_heads"] * QWEN25_05B["num_key_value_heads"]
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o
    layer = attn + 3 * h * i + 2 * h  # gate, up, down; two RMSNorms
    return (v * h + layers * layer + h) * itemsize  # tied embedding / head, final norm


def bandwidth_gbs(repeats: int = 7) -> float:
    """This machine's read bandwidth now: a 256 MB float32 ``torch.sum``, median of ``repeats``."""
    big = torch.ones(64 * 2**20)
    big.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t0)
    return big.numel() * 4 / statistics.median(times) / 1e9


def matmul_gflops(dtype: torch.dtype, repeats: int = 3) -> float:
    """The rate of this dtype's matrix product with many rows (512 x 896 by a [32768, 896] weight)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 896, generator=gen).to(dtype)
    w = torch.randn(32768, 896, generator=gen).to(dtype)
    torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * w.size(0) / statistics.median(times) / 1e9


# The linear-layer routes compared: (oneDNN at all, packed weights).
PATHS = {"ours": (True, True), "unpacked": (True, False), "default linears": (False, False)}


def run_ours(model, ids, mask, args, path: tuple[bool, bool]) -> tuple[float, float]:
    """(seconds for the whole call, seconds of it in the sampler's draws) on one of ``PATHS``."""
    from grpo_cli.engines.hf import decode, onednn

    gens = None if args.unseeded else decode.prompt_generators(range(ids.size(0)), ids.device)
    saved, draw = (onednn.MIN_HEAD_ELEMENTS, onednn.PACK_MIN_STEPS), decode._draw
    onednn.MIN_HEAD_ELEMENTS = saved[0] if path[0] else 2**62
    onednn.PACK_MIN_STEPS = saved[1] if path[1] else 2**62
    drawing = [0.0]

    def timed_draw(*a, **kw):
        t0 = time.perf_counter()
        out = draw(*a, **kw)
        drawing[0] += time.perf_counter() - t0
        return out

    decode._draw = timed_draw
    try:
        t0 = time.perf_counter()
        out, _ = decode.sample_group(
            model, ids, mask, args.group_size, args.new_tokens, eos_id=NEVER, pad_id=0, generators=gens
        )
        seconds = time.perf_counter() - t0
    finally:
        (onednn.MIN_HEAD_ELEMENTS, onednn.PACK_MIN_STEPS), decode._draw = saved, draw
    assert out.shape == (ids.size(0) * args.group_size, args.new_tokens), out.shape
    return seconds, drawing[0]


def bench_dtype(name: str, args: argparse.Namespace) -> dict[str, float]:
    dtype = getattr(torch, name)
    model = build_model(args.layers, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, QWEN25_05B["vocab_size"], (args.prompts, args.prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    paths = PATHS
    times: dict[str, list[float]] = {k: [] for k in paths}
    draws: list[float] = []
    gbs, gflops = [], []
    for path in paths.values():  # warm-up (long enough to pack)
        run_ours(model, ids, mask, argparse.Namespace(**{**vars(args), "new_tokens": 16}), path)
    for _ in range(args.repeats):
        gbs.append(bandwidth_gbs())
        gflops.append(matmul_gflops(dtype))
        for label, path in paths.items():
            seconds, drawing = run_ours(model, ids, mask, args, path)
            times[label].append(seconds)
            if label == "ours":
                draws.append(drawing)
    gb, rate = statistics.median(gbs), statistics.median(gflops)
    nbytes = weight_bytes(model)
    flops = 2 * ids.size(0) * args.group_size * sum(p.numel() for p in model.parameters())
    return {
        "bytes": nbytes,
        "gbs": gb,
        "gflops": rate,
        "floor": args.new_tokens * nbytes / (gb * 1e9),
        "compute floor": args.new_tokens * flops / (rate * 1e9),
        "draw": statistics.median(draws),
        **{label: statistics.median(v) for label, v in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n = args.prompts * args.group_size
    print(
        f"sample_group, Qwen2.5-0.5B dims with {args.layers} layers, random weights; {args.prompts} prompts "
        f"x G={args.group_size} (batch {n}), prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{'global RNG' if args.unseeded else 'seeded streams'}; torch threads {torch.get_num_threads()}; "
        f"median of {args.repeats} (a shared machine: timings are noisy)"
    )
    print(
        "| dtype | weights read / step MB | bandwidth GB/s | floor s | matmul GFLOP/s | compute floor s "
        "| ours s | draw s | ours / floor | ours / compute floor | unpacked s | default linears s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    gbs = None
    for name in args.dtypes:
        r = bench_dtype(name, args)
        gbs = gbs or r["gbs"]
        print(
            f"| {name} | {r['bytes'] / 1e6:.0f} | {r['gbs']:.1f} | {r['floor']:.2f} | {r['gflops']:.0f} "
            f"| {r['compute floor']:.2f} | {r['ours']:.2f} | {r['draw']:.2f} | {r['ours'] / r['floor']:.2f}x "
            f"| {r['ours'] / r['compute floor']:.2f}x | {r['unpacked']:.2f} | {r['default linears']:.2f} |",
            flush=True,
        )
    for layers in (args.layers, 24):
        for name, size in (("float32", 4), ("bfloat16", 2)):
            nbytes = paper_bytes(layers, size)
            print(
                f"on paper, {layers} layers {name}: {nbytes / 1e6:.0f} MB read per step, floor "
                f"{args.new_tokens} steps x {nbytes / 1e9:.3f} GB / {gbs:.1f} GB/s = "
                f"{args.new_tokens * nbytes / (gbs * 1e9):.2f} s"
            )


if __name__ == "__main__":
    main()
