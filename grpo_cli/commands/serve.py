"""``grpo serve``: one generation server for ``rollout.engine=vllm-server``, which is vLLM's own
OpenAI server started with what the trainer needs, and nothing of ours but the weight receiver.

    grpo serve --model tiny --port 8000                          # the tiny model, this machine's CPU
    CUDA_VISIBLE_DEVICES=1 grpo serve --model Qwen/Qwen2.5-0.5B-Instruct --port 8000
    grpo serve --model DIR --port 8000 -- --tensor-parallel-size 2   # after --: vLLM's own flags

It runs exactly (``--print`` shows it without running)::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR --port PORT
        --worker-extension-cls grpo_cli.engines.server.receiver.WeightReceiver
        --logprobs-mode processed_logprobs --generation-config vllm --enable-prefix-caching
        [--dtype float32 --enforce-eager on CPU]

Dev mode exposes ``/collective_rpc``, ``/reset_prefix_cache`` and ``/update_weight_version``, which
the weight sync uses; anyone who can reach the port can call them, so bind it to a private network
(``--host``). The processed log-probs are those of the distribution sampled (temperature, top-k,
top-p applied), as the colocated engine returns them; ``--generation-config vllm`` keeps the
model's generation_config.json from changing sampling.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from grpo_cli.models import resolve_path

RECEIVER = "grpo_cli.engines.server.receiver.WeightReceiver"


def command(args: argparse.Namespace, extra: Sequence[str], cuda: bool) -> tuple[list[str], dict[str, str]]:
    """The server's argv and the environment variables it adds."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", resolve_path(args.model), "--host", args.host, "--port", str(args.port),
        "--seed", str(args.seed),
        "--worker-extension-cls", RECEIVER, "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm", "--enable-prefix-caching",
    ]  # fmt: skip
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if not cuda:
        argv += ["--dtype", args.dtype or "float32", "--enforce-eager"]
    elif args.dtype:
        argv += ["--dtype", args.dtype]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if not cuda and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    return argv + list(extra), env


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo serve", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="tiny", help="a model directory, hub id, or tiny / tiny-tools / tiny-rg"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + completion (default: the model's)"
    )
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, the model's own on GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU only: VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--print", action="store_true", help="print the command and exit")
    return p


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("grpo serve: error: vLLM is not installed: run `make install-vllm`", file=sys.stderr)
        return 2
    import torch

    cmd, env = command(args, extra, torch.cuda.is_available())
    line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd)
    if args.print:
        print(line)
        return 0
    print(f"grpo serve: {line}", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, {**os.environ, **env})
    return 0  # not reached
