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

``--engines`` compares the generation engines instead (issue 12, needs `make install-vllm`):

    .venv/bin/python scripts/bench_rollout.py --engines                       # ~10 min on 2 busy cores
    .venv/bin/python scripts/bench_rollout.py --engines --shape-layers 2 4 --steps 4

1. the embedded tiny model on the default recipe (16 prompts x G=8, 16 new tokens, LoRA): median
   ``gen_time`` and ``step_time`` over ``--steps`` GRPO steps (after one warm-up step) with
   ``rollout.engine=hf`` and ``rollout.engine=vllm`` (the vLLM step includes its weight push);
2. LoRA on vLLM: merged weights pushed vs the adapter saved and loaded natively each update;
3. random-weight Qwen2 models with Qwen2.5-0.5B's shapes (hidden 896, 14 heads / 2 KV heads, MLP 4864,
   vocab 151,936, tied embeddings) and ``--shape-layers`` layers: ``--prompts`` prompts x G=8 x
   each of ``--shape-new-tokens`` (32 64 128 256) tokens at temperature 1, sampled by each engine
   (tokens/s over wall time, median of ``--repeats``), the vLLM weight push (full model), and the
   trainer's update (log-probs + backward of that batch, the same for both) to give a step time:
   the crossover table of docs/engines.md.
Both engines run in this one process, alternating, with the machine's default threads.
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
    p.add_argument("--engines", action="store_true", help="compare rollout.engine=hf and vllm (issue 12)")
    p.add_argument("--steps", type=int, default=5, help="--engines: timed GRPO steps per engine (tiny model)")
    p.add_argument("--shape-layers", type=int, nargs="*", default=[2, 4], help="--engines: Qwen2.5 shapes")
    p.add_argument(
        "--shape-new-tokens",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256],
        help="--engines: tokens per completion",
    )
    p.add_argument(
        "--parts", nargs="*", default=["tiny", "lora", "shape"], help="--engines: which comparisons"
    )
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
    from grpo_cli.engines.hf.decode import sample_group

    out, _ = sample_group(model, ids, mask, args.group_size, args.new_tokens, eos_id=NEVER, pad_id=0)
    return out.numel()


def ours_seeded(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace
) -> int:
    from grpo_cli.engines.hf.decode import prompt_generators, sample_group

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
    if args.engines:
        compare_engines(args)
        return
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


# ---------------------------------------------------------------------------- --engines (issue 12)


def _median_steps(engine: str, steps: int) -> dict[str, float]:
    """Median gen_time / step_time of ``steps`` GRPO steps of the default recipe (after one warm-up)."""
    import tempfile

    from grpo_cli.cli import compose_config
    from grpo_cli.commands.build import build_train_run
    from grpo_cli.commands.step import train_step
    from grpo_cli.commands.validate import validate

    cfg, _ = compose_config("train", [f"rollout.engine={engine}", "console=plain", "train.eval_problems=0"])
    validate(cfg)
    with build_train_run(cfg, Path(tempfile.mkdtemp(prefix=f"bench-{engine}-"))) as t:
        rows = [train_step(t, step)[0] for step in range(1, steps + 2)]
    rows = rows[1:]
    out = {k: statistics.median(r[k] for r in rows) for k in ("gen_time", "step_time", "completion_len")}
    out["tokens_per_s"] = statistics.median(
        r["completion_len"] * cfg.train.prompts_per_step * cfg.algo.group_size / r["gen_time"] for r in rows
    )
    return out


def qwen_shape_dir(layers: int, root: Path) -> Path:
    """A random-weight Qwen2 with Qwen2.5-0.5B's widths and ``layers`` layers, with the project's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_cli.models.tiny import make_tokenizer

    path = root / f"qwen2.5-shape-{layers}l"
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _shape_rows(path: Path, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """By completion length: tokens/s of each engine on one model, the vLLM push, and the trainer's
    update of the batch."""
    from grpo_cli import engines
    from grpo_cli.cli import compose_config
    from grpo_cli.models import load_policy

    prompt_len = 32
    cfg, _ = compose_config(
        "train",
        [
            f"model.name_or_path={path}",
            "lora=none",
            "rollout.engine=vllm",
            f"rollout.max_model_len={prompt_len + max(args.shape_new_tokens) + 64}",
            f"rollout.batch_size={args.prompts * args.group_size}",
        ],  # fmt: skip
    )
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, 200, (args.prompts, prompt_len), generator=gen)  # ids the tokenizer knows
    built = {}
    for name in ("hf", "vllm"):
        cfg.rollout.engine = name
        built[name] = engines.build_engine(policy, cfg.rollout, cfg.model, cfg.seed, prompts.size(1))
    t0 = time.perf_counter()
    built["vllm"].sync()
    push = time.perf_counter() - t0
    rows = {n: _shape_length(policy, built, prompts, n, args) | {"push": push} for n in args.shape_new_tokens}
    built["vllm"].close()
    for r in rows.values():
        r["vllm_step"] += push
    return rows


def _shape_length(policy, built: dict, prompts: torch.Tensor, new_tokens: int, args) -> dict[str, float]:
    """One completion length of ``_shape_rows``: both engines' tokens/s and the update's seconds."""
    from grpo_cli.engines import Decoding, Request
    from grpo_cli.models.logprobs import grouped_completion_logprobs

    requests = [
        Request(p.tolist(), args.group_size, new_tokens, (policy.tokenizer.eos_token_id,), seed=i)
        for i, p in enumerate(prompts)
    ]
    speeds: dict[str, list[float]] = {"hf": [], "vllm": []}
    for round_ in range(args.repeats + 1):  # the first round warms both up
        for name, engine in built.items():
            t0 = time.perf_counter()
            out = engine.generate(requests, Decoding())
            tokens = sum(len(c.token_ids) for group in out for c in group)
            if round_:
                speeds[name].append(tokens / (time.perf_counter() - t0))
    ids = torch.tensor([c.token_ids for group in out for c in group if len(c.token_ids) == new_tokens])
    t0 = time.perf_counter()
    logps = (
        grouped_completion_logprobs(
            policy.model,
            prompts,
            torch.ones_like(prompts),
            ids,
            torch.ones_like(ids),
            group_size=args.group_size,
        )
        if len(ids) == len(prompts) * args.group_size
        else None
    )
    if logps is not None:
        logps.mean().backward()
        policy.model.zero_grad(set_to_none=True)
    update = time.perf_counter() - t0 if logps is not None else float("nan")
    n = args.prompts * args.group_size * new_tokens
    hf, vl = statistics.median(speeds["hf"]), statistics.median(speeds["vllm"])
    return {"hf": hf, "vllm": vl, "update": update, "hf_step": n / hf + update, "vllm_step": n / vl + update}


def _lora_rows(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """LoRA on vLLM, merged weights pushed vs the adapter loaded natively (saved, new id each update).

    The tiny model's default LoRA (r=16, all linear layers, B perturbed so the adapter does something),
    16 arithmetic prompts x G=8 x 16 tokens per round; median seconds of the push and of the sampling.
    """
    import tempfile

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from grpo_cli.cli import compose_config
    from grpo_cli.data import build_prompt, load_rows
    from grpo_cli.engines.process import kept_process_state
    from grpo_cli.engines.vllm import VLLMEngine, _start, shutdown_all
    from grpo_cli.models import load_policy

    cfg, _ = compose_config("train", ["rollout.engine=vllm", "rollout.max_model_len=64"])
    torch.manual_seed(args.seed)
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tok = policy.tokenizer
    prompts = [
        TokensPrompt(prompt_token_ids=tok(build_prompt(r, cfg.data.template))["input_ids"])
        for r in load_rows(cfg.data, "test")[:16]
    ]
    params = [
        SamplingParams(
            n=8, max_tokens=16, seed=i, logprobs=0, detokenize=False, stop_token_ids=[tok.eos_token_id]
        )
        for i in range(len(prompts))
    ]
    shutdown_all()
    results: dict[str, dict[str, list[float]]] = {}
    merged = VLLMEngine.for_policy(policy, cfg)
    settings = dict(merged.settings)
    results["merged"] = {"push": [], "sample": []}
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        merged.sync()
        t1 = time.perf_counter()
        with kept_process_state():
            merged.llm.generate(prompts, params, use_tqdm=False)
        results["merged"]["push"].append(t1 - t0)
        results["merged"]["sample"].append(time.perf_counter() - t1)
    shutdown_all()
    llm = _start({**settings, "enable_lora": True, "max_lora_rank": cfg.lora.r, "max_loras": 1})
    results["native"] = {"push": [], "sample": []}
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        policy.model.save_pretrained(root / f"step-{i}")  # the adapter only
        request = LoRARequest(f"step-{i}", i + 1, str(root / f"step-{i}"))
        t1 = time.perf_counter()
        with kept_process_state():
            llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        results["native"]["push"].append(t1 - t0)
        results["native"]["sample"].append(time.perf_counter() - t1)
    from grpo_cli.engines.vllm import shutdown

    shutdown(llm)
    # The first round of each warms up (first call, first adapter load).
    return {k: {m: statistics.median(v[1:]) for m, v in r.items()} for k, r in results.items()}


def compare_engines(args: argparse.Namespace) -> None:
    print(f"torch threads {torch.get_num_threads()}; the machine is shared: compare within a row")
    if "tiny" in args.parts:
        _tiny_part(args)
    if "lora" in args.parts:
        _lora_part(args)
    if "shape" in args.parts:
        _shape_part(args)


def _tiny_part(args: argparse.Namespace) -> None:
    print("1. tiny model, default recipe (16 prompts x G=8, <=16 new tokens, LoRA), median of", args.steps)
    print(f"{'engine':>7} {'gen s':>7} {'step s':>7} {'gen tok/s':>10} {'len':>5}")
    for name in ("hf", "vllm"):
        r = _median_steps(name, args.steps)
        print(f"{name:>7} {r['gen_time']:>7.3f} {r['step_time']:>7.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['completion_len']:>5.1f}")  # fmt: skip


def _lora_part(args: argparse.Namespace) -> None:
    print(f"2. LoRA on vLLM (tiny model, 16 prompts x G=8 x 16 tokens): median of {args.repeats}")
    print(f"{'how':>7} {'push s':>7} {'sample s':>9}")
    for how, r in _lora_rows(args).items():
        print(f"{how:>7} {r['push']:>7.3f} {r['sample']:>9.3f}")


def _shape_part(args: argparse.Namespace) -> None:
    import tempfile

    print(f"3. Qwen2.5-0.5B shapes, random weights: {args.prompts} prompts x G={args.group_size}, "
          f"full-model push; median of {args.repeats}")  # fmt: skip
    print(
        "| layers | new tokens | hf tok/s | vllm tok/s | vllm / hf | push s | update s | hf step s | vllm step s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    root = Path(tempfile.mkdtemp(prefix="qwen-shape-"))
    for layers in args.shape_layers:
        for n, r in _shape_rows(qwen_shape_dir(layers, root), args).items():
            print(f"| {layers} | {n} | {r['hf']:.1f} | {r['vllm']:.1f} | {r['vllm'] / r['hf']:.2f} | {r['push']:.2f} "
                  f"| {r['update']:.2f} | {r['hf_step']:.1f} | {r['vllm_step']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
