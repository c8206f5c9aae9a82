"""Generation engines behind one small interface: ``hf`` (our prefix-shared decoding loop) and ``vllm``.

    grpo train rollout.engine=vllm               # needs `make install-vllm`
    grpo eval rollout.engine=vllm checkpoint=outputs/run/checkpoint-300

An engine turns token ids into token ids: a ``Request`` is one prompt's exact tokens, how many
completions to draw from it, a token budget, the token ids that end a completion and the seed of its
sampling stream; the answer is one ``Completion`` per draw, the sampled token ids (the stop token
included) and the log-prob of each under the distribution it was sampled from. Nothing is
re-tokenised on the way, so a later turn (multi-turn, tool calls) can extend a completion's exact
tokens and mask tool tokens out of the loss.

``rollout(...)`` is the batch form the drivers use: prompts in, one ``rollout.Rollout`` out. Every
driver gets its engine from ``build_engine``; it hangs the engine on the policy
(``Policy.rollout_engine``), where ``rollout.generate`` finds it. ``sync()`` pushes the policy's
current weights into an engine that keeps its own copy (vLLM); the trainer calls it after every
update and after a resume, before the next rollout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from grpo_cli.config import ConfigError

ENGINES = ("hf", "vllm")
INSTALL_HINT = "rollout.engine=vllm needs vLLM, which is not installed: run `make install-vllm`"


@dataclass
class Request:
    """One prompt's exact token ids and how to continue them."""

    prompt_ids: list[int]
    n: int  # completions drawn from this prompt (a GRPO group)
    max_tokens: int  # token budget per completion
    stop_token_ids: tuple[int, ...]  # a completion ends with the first of these (kept in its tokens)
    seed: int | None = None  # the sampling stream of the request's n draws; None: the global RNG


@dataclass
class Sampling:
    """How every request of a call is sampled (the rollout group's keys)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False


@dataclass
class Completion:
    token_ids: list[int]  # [T] sampled tokens, the stop token included when one ended it
    logprobs: list[float]  # [T] log-prob of each token under the sampling distribution (temperature applied)


class Engine(Protocol):
    name: str

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        """requests[i].n completions for each request, in request order."""

    def rollout(
        self,
        rows: Sequence[dict],
        prompts: Sequence[str],
        group_size: int,
        rollout_cfg: Any,
        chat_template: bool = False,
        greedy: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> Any:
        """``rollout.generate``'s contract: G completions per prompt as one unscored Rollout."""

    def sync(self) -> None:
        """Make the engine sample from the policy's current weights."""

    def pause(self) -> None:
        """Free what the engine holds while the trainer updates (the next ``sync`` brings it back)."""

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def check_engine(cfg: Any) -> None:
    """ConfigError (one line, exit 2) for an unknown engine or a missing vLLM; runs before any model loads."""
    name = cfg.rollout.engine
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine={name!r} is not allowed; choose one of: {', '.join(ENGINES)}")
    if name == "vllm" and not vllm_available():
        raise ConfigError(INSTALL_HINT)


def build_engine(cfg: Any, policy: Any, rows: Sequence[dict] = ()) -> Engine:
    """The engine ``rollout.engine`` names, for ``policy``, hung on it as ``policy.rollout_engine``.

    ``rows``: the dataset rows the run will prompt with, to size the vLLM engine (their longest prompt
    plus ``rollout.max_new_tokens`` is ``max_model_len`` unless ``rollout.max_model_len`` is set).
    """
    check_engine(cfg)
    if cfg.rollout.engine == "vllm":
        from grpo_cli.data import build_prompt
        from grpo_cli.engines.vllm import VLLMEngine

        prompts = [] if cfg.rollout.max_model_len else [build_prompt(r, cfg.data.template) for r in rows]
        engine: Engine = VLLMEngine.for_policy(policy, cfg, prompts)
    else:
        from grpo_cli.engines.hf import HFEngine

        engine = HFEngine(policy)
    policy.rollout_engine = engine
    return engine


def to_rollout(
    tokenizer: Any,
    rows: Sequence[dict],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: list[list[Completion]],
    group_size: int,
) -> Any:
    """One unscored Rollout from left-padded prompts [P, L] and P lists of G completions.

    Completion tensors are right-padded; ``engine_logps`` [N, T] holds the engine's log-probs (0 on padding).
    """
    from grpo_cli.rollout import Rollout

    flat = [c for group in completions for c in group]
    width = max(1, max(len(c.token_ids) for c in flat))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(flat), width), pad, dtype=torch.long)
    mask = torch.zeros((len(flat), width), dtype=torch.long)
    logps = torch.zeros((len(flat), width), dtype=torch.float32)
    for i, c in enumerate(flat):
        ids[i, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[i, : len(c.token_ids)] = 1
        logps[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    device = prompt_ids.device
    texts = tokenizer.batch_decode(ids.masked_fill(mask == 0, pad), skip_special_tokens=True)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, 0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, 0),
        completion_ids=ids.to(device),
        completion_mask=mask.to(device),
        texts=texts,
        rows=[row for row in rows for _ in range(group_size)],
        group_size=group_size,
        engine_logps=logps.to(device),
    )
