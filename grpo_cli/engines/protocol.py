"""The token-level protocol every generation engine implements (see ``grpo_cli.engines``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from grpo_cli.config import RolloutConfig

# progress(completions, tokens): called as batches of completions finish.
Progress = Callable[[int, int], None]


@dataclass
class Request:
    """One prompt's exact token ids and how to continue them."""

    prompt_ids: list[int]
    n: int  # completions drawn from this prompt (a GRPO group)
    max_tokens: int  # token budget per completion
    stop_token_ids: tuple[int, ...]  # a completion ends with the first of these (kept in its tokens)
    seed: int | None = None  # the sampling stream of the request's n draws; None: the global RNG


@dataclass
class Decoding:
    """How every request of a call draws its tokens (the ``rollout`` group's keys)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    # Return each token's log-prob from the hf engine too (a scoring pass; vLLM always returns them).
    logprobs: bool = False
    # Token ids never sampled (a tool's result markers: a result cannot be forged).
    banned_ids: tuple[int, ...] = ()
    # After temperature, tokens below min_p x the top token's probability are dropped; 0.0: off.
    min_p: float = 0.0

    @classmethod
    def of(cls, rollout: RolloutConfig, greedy: bool = False, temperature: float | None = None) -> Decoding:
        t = temperature or rollout.temperature
        return cls(t, rollout.top_k, rollout.top_p, greedy, min_p=rollout.min_p)


# vLLM adds the completion index to a request's seed: seeds stay below this, clear of int64 overflow.
SEED_RANGE = 2**62


def vllm_seed(seed: int | None) -> int:
    """The seed both vLLM engines send for a request seeded ``seed``; None draws one from the global
    torch RNG, as the hf engine's sampling would."""
    if seed is None:
        seed = int(torch.randint(0, SEED_RANGE, ()).item())
    return int(seed) % SEED_RANGE


@dataclass
class Completion:
    token_ids: list[int]  # [T] sampled tokens, the stop token included when one ended it
    # [T] log-prob of each token under the sampling distribution (temperature applied); None where the
    # engine samples from the trained weights themselves (hf: the trainer's log-probs are the same).
    logprobs: list[float] | None = None


class Engine(Protocol):
    """What both engines implement; ``build_engine`` makes one."""

    name: str

    def generate(
        self, requests: Sequence[Request], decoding: Decoding, progress: Progress | None = None
    ) -> list[list[Completion]]:
        """requests[i].n completions for each request, in request order."""

    def sync(self) -> None:
        """Make the engine sample from the policy's current weights."""

    def pause(self) -> None:
        """Free what the engine holds while the trainer updates (the next ``sync`` brings it back)."""

    def close(self) -> None:
        """Release the engine's hold on the policy."""
