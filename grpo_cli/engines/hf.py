"""The ``hf`` engine: the trainer's own model sampled with ``rollout.sample_group`` (the default).

    grpo train                       # rollout.engine=hf

It samples from the weights being trained, so there is nothing to sync, and its log-probs are the
trainer's up to float rounding. Batch rollouts go through ``rollout.generate`` unchanged (one prefill
per prompt, its KV cache shared by the G completions); ``generate`` serves token-level requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpo_cli.engines import Completion, Request, Sampling
from grpo_cli.models import grouped_completion_logprobs
from grpo_cli.rollout import generate, prompt_generators, sample_group


class HFEngine:
    name = "hf"

    def __init__(self, policy: Any):
        self.policy = policy

    def rollout(
        self,
        rows: Sequence[dict],
        prompts: Sequence[str],
        group_size: int,
        rollout_cfg: Any,
        fmt: tuple[bool, str | None] = (False, None),
        greedy: bool = False,
        seeds: Sequence[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        chat_template, system_prompt = fmt
        return generate(
            self.policy,
            rows,
            prompts,
            group_size,
            rollout_cfg,
            chat_template,
            greedy,
            seeds,
            system_prompt,
            progress,
        )

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        """One ``sample_group`` call per request; stops at ``stop_token_ids[0]`` while decoding and cuts
        each completion after the first of any stop id (later tokens never influence earlier ones).
        Log-probs: one scoring pass of the model at the sampling temperature (unfiltered)."""
        policy, tok = self.policy, self.policy.tokenizer
        model = policy.model
        was_training = model.training
        model.eval()
        out = []
        try:
            for req in requests:
                ids = torch.tensor([req.prompt_ids], device=policy.device)
                gens = None if req.seed is None else prompt_generators([req.seed], policy.device)
                c_ids, c_mask = policy.run(
                    sample_group,
                    ids,
                    torch.ones_like(ids),
                    req.n,
                    req.max_tokens,
                    req.stop_token_ids[0],
                    tok.pad_token_id,
                    sampling.temperature,
                    sampling.top_k,
                    sampling.top_p,
                    greedy=sampling.greedy,
                    generators=gens,
                )
                c_logps = policy.run(
                    grouped_completion_logprobs,
                    ids,
                    torch.ones_like(ids),
                    c_ids,
                    c_mask,
                    group_size=req.n,
                    temperature=sampling.temperature,
                )
                out.append([_cut(r, m, lp, req.stop_token_ids) for r, m, lp in zip(c_ids, c_mask, c_logps)])
        finally:
            model.train(was_training)
        return out

    def sync(self) -> None:
        """Nothing to do: this engine samples from the trained model itself."""

    def pause(self) -> None:
        """Nothing to free: the model is the trainer's."""

    def close(self) -> None:
        self.policy.rollout_engine = None


def _cut(ids: torch.Tensor, mask: torch.Tensor, logps: torch.Tensor, stops: Sequence[int]) -> Completion:
    n = int(mask.sum())
    tokens = ids[:n].tolist()
    for i, t in enumerate(tokens):
        if t in stops:
            n = i + 1
            break
    return Completion(token_ids=tokens[:n], logprobs=logps[:n].tolist())
