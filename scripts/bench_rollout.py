"""Rollout speed: our prefix-shared ``sample_group`` against ``model.generate(num_return_sequences=G)``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout.py              # ~6 min on 1 busy CPU core
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout.py --lengths 16 --repeats 1   # ~20 s

A randomly initialised Qwen2 (hidden 512, 8 layers, vocab 32k: ~42 M parameters, float32) samples
G = 8 completions of ``--prompts`` random-token prompts of each length, ``--new-tokens`` tokens each,
at temperature 1 with no top-k / top-p filtering. EOS is suppressed on both sides (``generate`` gets
no EOS id; ours gets an id no token has), so both produce exactly prompts x G x new-tokens tokens.
Three paths alternate over ``--repeats`` rounds after one warm-up each: ours with the global RNG
(``grpo sample`` / ``grpo eval``), ours with per-prompt seeded streams (what ``grpo train`` runs), and
``generate``; the table shows median tokens/s (generated tokens over wall time, prefill included)
and the ratios to ``generate``.
Target (issue 8): ratio >= 1.5 at prompt length 512 with G = 8.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

NEVER = -1  # an EOS id no sampled token can equal: every row decodes all its tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512], help="prompt lengths in tokens")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--prompts", type=int, default=2, help="distinct prompts per call")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per completion")
    p.add_argument("--repeats", type=int, default=3, help="timed A/B rounds per length (median reported)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialised Qwen2 with the given width and depth, eval mode, float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(args.hidden // 64, 1)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(config).eval()


def ours(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace) -> int:
    from grpo_cli.rollout import sample_group

    out, _ = sample_group(model, ids, mask, args.group_size, args.new_tokens, eos_id=NEVER, pad_id=0)
    return out.numel()


def ours_seeded(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace
) -> int:
    from grpo_cli.rollout import prompt_generators, sample_group

    gens = prompt_generators(range(ids.size(0)), ids.device)
    out, _ = sample_group(
        model, ids, mask, args.group_size, args.new_tokens, eos_id=NEVER, pad_id=0, generators=gens
    )
    return out.numel()


@torch.inference_mode()
def hf_generate(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace
) -> int:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=args.new_tokens,
        num_return_sequences=args.group_size,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[:, ids.size(1) :].numel()


def timed(fn: Callable[..., int], *args: object) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - t0, tokens


def bench_length(model: torch.nn.Module, length: int, args: argparse.Namespace) -> dict[str, float]:
    """Median tokens/s of both paths at one prompt length (one warm-up each, then A B A B...)."""
    gen = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(1, args.vocab, (args.prompts, length), generator=gen)
    mask = torch.ones_like(ids)
    paths = {"ours": ours, "seeded": ours_seeded, "generate": hf_generate}
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():  # warm-up: first-call allocations, lazy imports
        timed(fn, model, ids, mask, args)
    for _ in range(args.repeats):
        for name, fn in paths.items():
            seconds, tokens = timed(fn, model, ids, mask, args)
            expected = args.prompts * args.group_size * args.new_tokens
            assert tokens == expected, f"{name} produced {tokens} tokens, expected {expected}"
            speeds[name].append(tokens / seconds)
    return {name: statistics.median(v) for name, v in speeds.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"Qwen2 random init: {params:.1f} M params, hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}; {args.prompts} prompts x G={args.group_size} x {args.new_tokens} new tokens; "
        f"torch threads {torch.get_num_threads()}; median of {args.repeats}"
    )
    print(
        f"{'prompt len':>10} {'ours tok/s':>11} {'seeded tok/s':>13} {'generate tok/s':>15} "
        f"{'ratio':>6} {'seeded ratio':>13}"
    )
    for length in args.lengths:
        r = bench_length(model, length, args)
        print(
            f"{length:>10} {r['ours']:>11.1f} {r['seeded']:>13.1f} {r['generate']:>15.1f} "
            f"{r['ours'] / r['generate']:>6.2f} {r['seeded'] / r['generate']:>13.2f}"
        )


if __name__ == "__main__":
    main()
