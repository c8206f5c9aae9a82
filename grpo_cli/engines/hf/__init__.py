"""The ``hf`` engine (the default): the trainer's own model, sampled by our decoding loop (``decode``).

    grpo train                       # rollout.engine=hf

It samples from the weights being trained, so there is nothing to sync and no log-probs to return
(the trainer's are the sampler's, up to float rounding). Requests are decoded in chunks of at most
``rollout.batch_size`` completions; each chunk left-pads its prompts, prefills each prompt once and
shares that KV cache among the prompt's n completions. A request's seed gives its completions their
own sampling stream, so what a prompt gets does not depend on which other prompts share its chunk.
With ``Decoding.logprobs`` a scoring pass also returns each token's log-prob (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grpo_cli.engines.hf.decode import prompt_generators, sample_group
from grpo_cli.engines.protocol import Completion, Decoding, Progress, Request
from grpo_cli.models import Policy
from grpo_cli.models.logprobs import grouped_completion_logprobs


class HFEngine:
    name = "hf"

    def __init__(self, policy: Policy, batch_size: int):
        self.policy, self.batch_size = policy, batch_size

    def generate(
        self, requests: Sequence[Request], decoding: Decoding, progress: Progress | None = None
    ) -> list[list[Completion]]:
        """requests[i].n completions of each request, decoded in chunks of whole requests."""
        out: list[list[Completion]] = []
        with self.policy.sampling():
            for chunk in _chunks(requests, self.batch_size):
                out += self._decode_chunk(chunk, decoding)
                if progress is not None:
                    done = out[-len(chunk) :]
                    progress(sum(len(g) for g in done), sum(len(c.token_ids) for g in done for c in g))
        return out

    def _decode_chunk(self, chunk: Sequence[Request], decoding: Decoding) -> list[list[Completion]]:
        policy, first = self.policy, chunk[0]
        ids, mask = left_pad([r.prompt_ids for r in chunk], policy.tokenizer.pad_token_id, policy.device)
        seeds = [r.seed for r in chunk]
        generators = None if None in seeds else prompt_generators(seeds, policy.device)
        c_ids, c_mask = policy.run(
            sample_group,
            ids,
            mask,
            first.n,
            max(r.max_tokens for r in chunk),
            first.stop_token_ids,
            policy.tokenizer.pad_token_id,
            decoding,
            generators=generators,
            synced=policy.lockstep,
        )
        logps = None
        if decoding.logprobs:  # at the sampling temperature, unfiltered
            with torch.no_grad():
                logps = policy.run(
                    grouped_completion_logprobs, ids, mask, c_ids, c_mask, first.n, decoding.temperature
                )
        budgets = [r.max_tokens for r in chunk for _ in range(first.n)]
        lengths = [min(n, b) for n, b in zip(c_mask.sum(1).tolist(), budgets)]
        rows = [
            Completion(c_ids[i, :n].tolist(), None if logps is None else logps[i, :n].tolist())
            for i, n in enumerate(lengths)
        ]
        return [rows[i * first.n : (i + 1) * first.n] for i in range(len(chunk))]

    def sync(self) -> None:
        """Nothing to do: this engine samples from the trained model itself."""

    def pause(self) -> None:
        """Nothing to free: the model is the trainer's."""

    def close(self) -> None:
        """Nothing to release."""


def _chunks(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """Consecutive runs of requests with the same n and stop ids, of at most ``batch_size`` completions
    each (at least one request). Budgets may differ: a chunk decodes to its largest and cuts each
    completion to its own (a stream's first tokens do not depend on how many follow)."""
    chunks: list[list[Request]] = []
    for req in requests:
        last = chunks[-1] if chunks else None
        fits = last is not None and (len(last) + 1) * req.n <= max(batch_size, req.n)
        if fits and (last[0].n, last[0].stop_token_ids) == (req.n, req.stop_token_ids):
            last.append(req)
        else:
            chunks.append([req])
    return chunks


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as left-padded ids and mask [P, L]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)
