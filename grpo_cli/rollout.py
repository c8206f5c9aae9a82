"""Rollout: G completions per prompt, decoded and scored, returned as one ``Rollout`` batch.

Each distinct prompt is prefilled once and its KV cache is repeated G times, so a group of G
completions pays for one prefill instead of G (Hugging Face's ``generate(num_return_sequences=G)``
expands the input and prefills every copy). Decoding then runs all sequences of a chunk together
with the KV cache and stops as soon as every sequence has produced EOS; rows that have finished
leave the decoding batch (their KV rows dropped) once a quarter of it has finished, so a long tail
of completions does not pay for the short ones (1.4x on ragged lengths, mean 41 of 96 tokens).

Sampling applies temperature, then top-k, then top-p: the order and the filtering rules of
``model.generate``'s warpers. Without per-prompt seeds the draw is ``torch.multinomial`` on the
float32 probabilities from the global RNG, so for the same logits and RNG state the same tokens come
out as from ``generate``. With seeds (training) each group's uniforms come from its own generator,
drawn once per rollout, and every step's tokens are one inverse-CDF lookup for the whole batch: the
same distribution, a different stream, and no per-group work per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_cli.models import Policy, positions


@dataclass
class Rollout:
    """One batch of N = num_prompts * G completions; group i is rows [i*G, (i+1)*G)."""

    prompt_ids: torch.Tensor  # [N, L] left-padded prompt tokens, repeated for each completion
    prompt_mask: torch.Tensor  # [N, L] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] sampled tokens, pad after EOS
    completion_mask: torch.Tensor  # [N, T] 1 on sampled tokens (EOS included)
    texts: list[str]  # [N] decoded completions (special tokens dropped)
    rows: list[dict]  # [N] the dataset row behind each completion
    group_size: int
    rewards: torch.Tensor | None = None  # [N] float32; NaN where no rule could judge the completion
    per_rule: dict[str, list[float | None]] = field(default_factory=dict)
    reward_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.texts) // self.group_size

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def accuracy(self) -> float:
        """Fraction of completions the first reward rule scores 1 (for ``reward=math``: a right answer)."""
        first = next(iter(self.per_rule.values()), [])
        return sum(s == 1.0 for s in first) / max(len(first), 1)

    def select(self, index: torch.Tensor | Sequence[int]) -> Rollout:
        """The completions at ``index`` (whole groups, to keep advantages meaningful)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return Rollout(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            texts=[self.texts[i] for i in pick],
            rows=[self.rows[i] for i in pick],
            group_size=self.group_size,
            rewards=None if self.rewards is None else self.rewards[idx.to(self.rewards.device)],
            per_rule={k: [v[i] for i in pick] for k, v in self.per_rule.items()},
            reward_metrics=dict(self.reward_metrics),
        )


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k, top-p on [B, V] float32 logits, as ``generate``'s warpers do."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def _expand_cache(cache: Any, repeats: int) -> None:
    """Repeat every layer's keys and values along the batch: one prefill serves G completions."""
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)


# Drop finished rows from the decoding batch once at least this fraction of it has finished: fewer
# rows per forward, against one gather of the KV cache (cheap next to a forward).
COMPACT_FRACTION = 0.25


def sample_group(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    return_logprobs: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    synced: bool = False,
):
    """Sample G completions for each of P left-padded prompts.

    prompt_ids, prompt_mask: [P, L]. Returns completion ids [P*G, T] (pad after EOS) and mask [P*G, T]
    (1 on sampled tokens including EOS), T <= max_new_tokens; with ``return_logprobs`` also the
    log-prob [P*G, T] of each sampled token under the temperature-scaled (unfiltered) distribution.

    Rows that have produced EOS leave the model's batch (their KV cache rows are dropped), but the
    sampler still draws for all N rows from an [N, V] tensor, finished rows holding their last logits:
    ``torch.multinomial`` draws one exponential per entry whatever the values, so the random stream,
    and with it every live row's token, is the one ``generate`` (which decodes every row) would give.

    ``generators``: one per prompt; its G completions draw from it alone (inverse CDF on uniforms it
    gives up front), so what a prompt gets depends on its generator's seed, not on which other
    prompts share the batch (or the rank); None draws from the global torch RNG, as ``generate``
    does. ``synced`` (FSDP, where each forward is a collective): keep decoding until every rank's
    sequences have ended.
    """
    # FSDP reuses its gather buffers outside this call, which inference tensors forbid.
    with torch.no_grad() if synced else torch.inference_mode():
        pos = positions(prompt_mask)
        uniforms = None
        if generators is not None and not greedy:
            uniforms = _group_uniforms(generators, group_size, max_new_tokens, prompt_ids.device)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        _expand_cache(cache, group_size)
        logits = out.logits[:, -1].float().repeat_interleave(group_size, 0)  # [N, V]
        mask = prompt_mask.repeat_interleave(group_size, 0)  # [n_live, L + t]
        next_pos = pos[:, -1:].repeat_interleave(group_size, 0) + 1  # [n_live, 1]
        n = logits.size(0)
        live = torch.arange(n, device=logits.device)  # rows of the N still in the model's batch
        done = torch.zeros(n, dtype=torch.bool, device=logits.device)
        tokens, logprobs = [], []
        for step in range(max_new_tokens):
            if greedy:
                tok = logits.argmax(-1)
            else:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                tok = (
                    torch.multinomial(probs, 1).squeeze(1)
                    if uniforms is None
                    else _inverse_cdf(probs, uniforms[step])
                )
            tok = tok.masked_fill(done, pad_id)
            tokens.append(tok)
            if return_logprobs:
                logprobs.append(
                    torch.log_softmax(logits / temperature, -1).gather(1, tok[:, None]).squeeze(1)
                )
            done = done | (tok == eos_id)
            n_done = int(done.sum())  # the one host sync of a decode step
            finished = n_done == n
            if synced:
                from grpo_cli.distributed import all_ranks

                finished = all_ranks(finished)
            if step == max_new_tokens - 1 or finished:
                break
            live, mask, next_pos = _compact(cache, live, done, n_done, mask, next_pos)
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            out = model(
                input_ids=tok[live, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            if len(live) == n:
                logits = out.logits[:, -1].float()
            else:  # finished rows keep stale logits: only their random draws matter, and those are masked
                logits.index_copy_(0, live, out.logits[:, -1].float())
            next_pos = next_pos + 1
        ids = torch.stack(tokens, dim=1)  # [N, T]
        # A token is part of the completion up to and including the first EOS.
        is_eos = ids == eos_id
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        # Columns past every row's end exist only when decoding kept step with other ranks: drop them.
        width = int((~after_eos).any(0).nonzero().max()) + 1
        ids, mask = ids[:, :width], (~after_eos[:, :width]).long()
        if return_logprobs:
            return ids, mask, torch.stack(logprobs, dim=1)[:, :width]
        return ids, mask


def _group_uniforms(
    generators: Sequence[torch.Generator], group_size: int, steps: int, device: torch.device
) -> torch.Tensor:
    """Uniforms [steps, P*G] in [0, 1): column block p (group p's rows) from generators[p]."""
    per_group = [torch.rand(steps, group_size, generator=g, device=device) for g in generators]
    return torch.cat(per_group, dim=1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i of probs [N, V] sampled by its uniform u[i]: the first token whose CDF exceeds u * total.

    float64 CDF: float32 cumulative sums over a 150k vocabulary lose the low-probability tokens. A
    token of probability 0 (filtered out) has an empty CDF interval and is never returned.
    """
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.size(-1) - 1)


def prompt_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One seeded generator per prompt (the sampling stream of its group)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _compact(
    cache: Any,
    live: torch.Tensor,
    done: torch.Tensor,
    n_done: int,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop finished rows from the decoding batch when enough have finished since the last drop.

    live: [n_live] row numbers (of N) in the batch; done: [N], n_done its count; mask [n_live, S],
    next_pos [n_live, 1].
    """
    # Rows already dropped are all done, so the live ones that finished number n_done - dropped.
    n_finished = n_done - (done.numel() - len(live))
    # All finished happens only while decoding in step with other ranks: keep the batch non-empty.
    if n_finished == 0 or n_finished < COMPACT_FRACTION * len(live) or n_finished == len(live):
        return live, mask, next_pos
    keep = (~done[live]).nonzero().squeeze(1)  # positions within the current batch
    cache.batch_select_indices(keep)
    return live[keep], mask[keep], next_pos[keep]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool, device: torch.device):
    """Left-padded prompt ids and mask [P, L]; the chat template wraps each prompt when asked."""
    if chat_template:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _pad_cat(chunks: list[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    width = max(c.size(1) for c in chunks)
    padded = []
    for c in chunks:
        pad = torch.full((c.size(0), width - c.size(1)), value, dtype=c.dtype, device=c.device)
        padded.append(torch.cat([pad, c] if left else [c, pad], dim=1))
    return torch.cat(padded, dim=0)


def generate(
    policy: Policy,
    rows: Sequence[dict],
    prompts: Sequence[str],
    group_size: int,
    rollout_cfg: Any,
    chat_template: bool = False,
    greedy: bool = False,
    seeds: Sequence[int] | None = None,
) -> Rollout:
    """G completions for each prompt (rows[i] is the dataset row of prompts[i]), decoded, not yet scored.

    ``seeds``: one per prompt, the seed of its group's sampling stream (``sample_group``'s
    generators); None samples from the global torch RNG.
    """
    tok = policy.tokenizer
    model = policy.model
    was_training = model.training
    model.eval()  # dropout off while sampling
    per_chunk = max(1, rollout_cfg.batch_size // group_size)
    parts: dict[str, list[torch.Tensor]] = {"p": [], "pm": [], "c": [], "cm": []}
    try:
        for start in range(0, len(prompts), per_chunk):
            p_ids, p_mask = encode_prompts(
                tok, prompts[start : start + per_chunk], chat_template, policy.device
            )
            gens = (
                None if seeds is None else prompt_generators(seeds[start : start + per_chunk], policy.device)
            )
            c_ids, c_mask = policy.run(
                sample_group,
                p_ids,
                p_mask,
                group_size,
                rollout_cfg.max_new_tokens,
                tok.eos_token_id,
                tok.pad_token_id,
                rollout_cfg.temperature,
                rollout_cfg.top_k,
                rollout_cfg.top_p,
                greedy=greedy,
                generators=gens,
                synced=policy.lockstep,
            )
            parts["p"].append(p_ids.repeat_interleave(group_size, 0))
            parts["pm"].append(p_mask.repeat_interleave(group_size, 0))
            parts["c"].append(c_ids)
            parts["cm"].append(c_mask)
    finally:
        model.train(was_training)
    c_ids = _pad_cat(parts["c"], tok.pad_token_id)
    c_mask = _pad_cat(parts["cm"], 0)
    texts = tok.batch_decode(c_ids.masked_fill(c_mask == 0, tok.pad_token_id), skip_special_tokens=True)
    return Rollout(
        prompt_ids=_pad_cat(parts["p"], tok.pad_token_id, left=True),
        prompt_mask=_pad_cat(parts["pm"], 0, left=True),
        completion_ids=c_ids,
        completion_mask=c_mask,
        texts=texts,
        rows=[row for row in rows for _ in range(group_size)],
        group_size=group_size,
    )


def score(rollout: Rollout, rewarder: Any) -> Rollout:
    """Fill in rewards from the reward rules (None -> NaN: not judged)."""
    result = rewarder(rollout.texts, rollout.rows)
    rollout.rewards = torch.tensor(
        [float("nan") if r is None else float(r) for r in result.total], dtype=torch.float32
    )
    rollout.per_rule = result.per_rule
    rollout.reward_metrics = result.metrics
    return rollout


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Several scored rollouts as one: prompts re-padded on the left, completions on the right.

    Reward counters (``reward/<rule>/<count>``, ``reward/unjudged``) are summed over the parts, the
    other reward metrics averaged (every part holds the same number of completions).
    """
    if len(parts) == 1:
        return parts[0]

    metrics: dict[str, float] = {}
    for key in {k for p in parts for k in p.reward_metrics}:
        values = [p.reward_metrics[key] for p in parts if key in p.reward_metrics]
        is_count = key.count("/") >= 2 or key == "reward/unjudged"
        metrics[key] = sum(values) if is_count else sum(values) / len(values)
    return Rollout(
        prompt_ids=_pad_cat([p.prompt_ids for p in parts], pad_id, left=True),
        prompt_mask=_pad_cat([p.prompt_mask for p in parts], 0, left=True),
        completion_ids=_pad_cat([p.completion_ids for p in parts], pad_id),
        completion_mask=_pad_cat([p.completion_mask for p in parts], 0),
        texts=[t for p in parts for t in p.texts],
        rows=[r for p in parts for r in p.rows],
        group_size=parts[0].group_size,
        rewards=torch.cat([p.rewards for p in parts]),
        per_rule={k: [s for p in parts for s in p.per_rule[k]] for k in parts[0].per_rule},
        reward_metrics=metrics,
    )
