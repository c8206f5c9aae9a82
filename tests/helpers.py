"""Helpers several test files share (importable as ``helpers``: pytest puts tests/ on sys.path for conftest.py)."""

from __future__ import annotations

import builtins
import errno
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from grpo_cli.engines.hf import left_pad
from grpo_cli.rollout.generate import PromptFormat
from grpo_cli.run import manifest
from grpo_cli.run.runlog import is_timing  # noqa: F401 - the tests' one definition of a timing

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    chat_template: bool,
    device: Any,
    system_prompt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt texts as the rollout layer encodes them, left-padded: ids and mask [P, L]."""
    fmt = PromptFormat("{question}", chat_template, system_prompt)
    ids = fmt.encode(tokenizer, [{"question": p} for p in prompts])
    return left_pad(ids, tokenizer.pad_token_id, device)


def sequence_logprobs(
    engine: Any, sequences: Sequence[Sequence[int]], start: Sequence[int]
) -> list[list[float]]:
    """vLLM's log-probs (temperature 1) of tokens ``start[i]:`` of each sequence, each given the tokens
    before it: what the engine assigns to a fixed completion (the check that a weight push arrived)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from grpo_cli.engines.process import kept_process_state

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
    with kept_process_state():
        engine.llm.reset_prefix_cache()
        outs = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
        )
    return [
        [d[t].logprob for t, d in zip(seq[s:], out.prompt_logprobs[s:])]
        for seq, s, out in zip(sequences, start, outs)
    ]


def roll_out(
    policy: Any,
    rows: Sequence[dict],
    prompts: Sequence[str],
    group_size: int,
    rollout_cfg: Any,
    chat_template: bool = False,
    greedy: bool = False,
    seeds: Sequence[int] | None = None,
    system_prompt: str | None = None,
    engine: Any = None,
) -> Any:
    """``rollout.generate`` on prompt texts (``prompts[i]`` is row i's prompt), on the hf engine unless
    ``engine`` is given; the Rollout keeps the original rows."""
    from grpo_cli.engines import Decoding
    from grpo_cli.engines.hf import HFEngine
    from grpo_cli.rollout.generate import Sampler

    engine = engine or HFEngine(policy, rollout_cfg.batch_size)
    fmt = PromptFormat("{question}", chat_template, system_prompt)
    texts = [{**r, "question": p} for r, p in zip(rows, prompts)]
    sampler = Sampler.single_turn(engine, policy, fmt, rollout_cfg)
    ro = sampler.generate(texts, group_size, Decoding.of(rollout_cfg, greedy), seeds)
    ro.rows = [r for r in rows for _ in range(group_size)]
    return ro


def held_out(policy: Any, rows: list[dict], cfg: Any, rewarder: Any) -> dict[str, float]:
    """``grpo train``'s held-out metrics of ``policy`` on ``rows`` under a composed train config."""
    from grpo_cli.commands.heldout import held_out_metrics
    from grpo_cli.engines.hf import HFEngine
    from grpo_cli.rollout.generate import Sampler

    engine = HFEngine(policy, cfg.rollout.batch_size)
    sampler = Sampler.single_turn(engine, policy, PromptFormat.of(cfg.data, cfg.model), cfg.rollout)
    return held_out_metrics(sampler, rewarder, rows, cfg.train, cfg.seed)


def dtype_twins(model_dir: Any, lora: bool, beta: float = 0.04) -> tuple[Any, Any]:
    """One model loaded twice on CPU, with ``model.dtype=float32`` and ``bfloat16``. With LoRA (r 4) both
    hold the same float32 adapter, its B drawn non-zero so that it changes the log-probs."""
    from grpo_cli.config import LoraConfig, ModelConfig
    from grpo_cli.models import load_policy

    lora_cfg = LoraConfig(r=4, alpha=8) if lora else LoraConfig(enabled=False)
    f32, bf16 = (
        load_policy(ModelConfig(name_or_path=str(model_dir), dtype=d, device="cpu"), lora_cfg, beta)
        for d in ("float32", "bfloat16")
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, a), (_, b) in zip(f32.model.named_parameters(), bf16.model.named_parameters()):
            if "lora_B" in name:
                a.normal_(0, 0.05, generator=gen)
            if "lora_" in name:
                b.copy_(a)
    return f32, bf16


def arithmetic_rollout(policy: Any, group_size: int = 4, problems: int = 4, seed: int = 0) -> Any:
    """``problems`` arithmetic prompts x G completions of up to 16 tokens sampled from ``policy``
    (the tiny model's template), with fixed rewards that differ within every group."""
    from grpo_cli.config import DataConfig, RolloutConfig
    from grpo_cli.data import build_prompt, load_rows
    from grpo_cli.models.tiny import TEMPLATE

    rows = load_rows(DataConfig(name="arithmetic", template=TEMPLATE), "train")[:problems]
    prompts = [build_prompt(r, TEMPLATE) for r in rows]
    seeds = [seed * problems + i for i in range(problems)]
    ro = roll_out(policy, rows, prompts, group_size, RolloutConfig(max_new_tokens=16), seeds=seeds)
    ro.rewards = torch.tensor([(i * 7 % 5) / 4 for i in range(problems * group_size)])  # 0, .5, 1, .25, ...
    return ro


class FullDisk:
    """A file that takes ``room`` bytes, then raises OSError(ENOSPC), as a full disk does mid-write."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.room:
            self.file.write(view[: self.room])  # what fits is written, as on a real disk
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(view)
        return self.file.write(view)

    def __getattr__(self, name: str) -> Any:  # flush, close, ...
        return getattr(self.file, name)


def full_disk(monkeypatch: Any, name: str, room: Callable[[], int], nth: int = 1) -> None:
    """The ``nth`` file called ``name`` that ``grpo_cli.run.manifest`` writes gets ``room()`` bytes,
    then OSError(ENOSPC); every other file is written as usual."""
    seen = [0]

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name == name:
            seen[0] += 1
            if seen[0] == nth:
                return FullDisk(file, room())
        return file

    monkeypatch.setattr(manifest, "open", fake_open, raising=False)


# ---------------------------------------------------------------------------- training runs in-process


def run_train(overrides: list[str], run_dir: Path) -> dict:
    """``grpo train`` in this process on the composed, validated overrides."""
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train
    from grpo_cli.commands.validate import validate

    cfg, _ = compose_config("train", overrides)
    validate(cfg)
    return train.run(cfg, str(run_dir))


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """The run's metrics.jsonl by step, timings left out; fails on a step logged twice."""
    from grpo_cli.run.runlog import read_metrics

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metric rows: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if not is_timing(k)} for r in rows}


def model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A full fine-tuning checkpoint's weights."""
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def float64_qwen2(vocab: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Any:
    """A 2-layer, 16-dim Qwen2 with wide random weights (log-probs far from uniform, gradients far
    from 0), in training mode; in float64 its RMSNorm stays in float64 (``_rms_norm_in_dtype``)."""
    from types import MethodType

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).to(dtype).train()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__ == "Qwen2RMSNorm":
                module.forward = MethodType(_rms_norm_in_dtype, module)
    return model


def _rms_norm_in_dtype(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm without its detour through float32 (it casts its input to float32 whatever the
    dtype): with it, gradients summed in different orders (a prompt shared by G completions, or
    one per completion) differ by ~1e-7, and no float64 comparison could go below that."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _gloo_rank(rank: int, port: int, fn: Callable[[int], dict], out: str) -> None:
    import json

    from grpo_cli.runtime import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.init()
    try:
        result = fn(rank)
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        distributed.shutdown()


def on_two_gloo_ranks(fn: Callable[[int], dict], tmp_path: Path) -> list[dict]:
    """``fn(rank)`` run in two spawned processes joined in one gloo group (one thread each); the two
    JSON-able dicts it returns, rank 0's first. ``fn`` must be a module-level function (it is pickled)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(_gloo_rank, args=(port, fn, out), nprocs=2, join=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
