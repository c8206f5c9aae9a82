"""The hf engine's decoding loop: G completions of each of P left-padded prompts, with the KV cache.

Each distinct prompt is prefilled once and its KV cache is repeated G times, so a group of G
completions pays for one prefill instead of G (Hugging Face's ``generate(num_return_sequences=G)``
expands the input and prefills every copy). Decoding then runs all sequences of a chunk together
with the KV cache and stops as soon as every sequence has produced EOS; rows that have finished
leave the decoding batch (their KV rows dropped) once a quarter of it has finished, so a long tail
of completions does not pay for the short ones.

Sampling applies temperature, then min-p (``rollout.min_p``, off by default), then top-k, then top-p:
``model.generate``'s warpers' rules, in vLLM's order (``generate`` applies min-p after top-p; the two
orders differ only when min-p and top-p are both on). Without per-prompt seeds the draw is ``torch.multinomial`` on the
float32 probabilities from the global RNG, so for the same logits and RNG state the same tokens come
out as from ``generate``. With seeds (training) each group's uniforms come from its own generator,
drawn once per rollout, and every step's tokens are one inverse-CDF lookup for the whole batch: the
same distribution, a different stream, and no per-group work per token.

On CPU, float32 and bfloat16 linears run on oneDNN while sampling, the large weights packed
(``engines.hf.onednn``: faster than MKL at a decode step's few rows; docs/performance.md); the logits
then equal ``generate``'s up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from grpo_cli.engines.hf.onednn import fast_linears
from grpo_cli.engines.protocol import Decoding
from grpo_cli.models.logprobs import cache_arg, output_cache, positions
from grpo_cli.runtime.distributed import all_ranks


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p on [B, V] float32 logits, as ``generate``'s warpers and vLLM's
    sampler do (min-p in vLLM's place: before top-k and top-p)."""
    if temperature != 1.0:
        logits = logits / temperature
    if min_p > 0.0:
        # vLLM's rule, in float32 as it computes it: p < min_p * max p is dropped (the top token never is).
        probs = logits.softmax(-1)
        floor = probs.amax(-1, keepdim=True) * torch.tensor(min_p, dtype=probs.dtype, device=probs.device)
        logits = logits.masked_fill(probs < floor, float("-inf"))
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


SAMPLED = Decoding()  # temperature 1, no filtering: the default draw

# Drop finished rows from the decoding batch once at least this fraction of it has finished: fewer
# rows per forward, against one gather of the KV cache (cheap next to a forward).
COMPACT_FRACTION = 0.25


def sample_group(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    eos_id: int | Sequence[int],  # one id or the EOS set: a completion ends at the first of them
    pad_id: int,
    decoding: Decoding = SAMPLED,
    generators: Sequence[torch.Generator] | None = None,
    synced: bool = False,
):
    """Sample G completions for each of P left-padded prompts, drawn as ``decoding`` says (temperature,
    top-k, top-p, min-p, greedy, banned ids).

    Below the engine protocol, so its arguments are the decoding loop's tensors and a Request's fields
    one by one (prompts, G, the budget, the stop and pad ids) beside the ``Decoding``.

    prompt_ids, prompt_mask: [P, L]. Returns completion ids [P*G, T] (pad after EOS) and mask [P*G, T]
    (1 on sampled tokens including EOS), T <= max_new_tokens.

    Rows that have produced EOS leave the model's batch (their KV cache rows are dropped), but the
    sampler still draws for all N rows from an [N, V] tensor, finished rows holding their last logits:
    ``torch.multinomial`` draws one exponential per entry whatever the values, so the random stream,
    and with it every live row's token, is the one ``generate`` (which decodes every row) would give.

    ``decoding.banned_ids``: ids never sampled (a tool's result markers). ``generators``: one per prompt; its G
    completions draw from it alone (inverse CDF on uniforms it gives up front), so what a prompt gets
    depends on its seed, not on which other prompts share the batch (or the rank); None draws from
    the global torch RNG, as ``generate`` does. ``synced`` (FSDP, where each forward is a
    collective): keep decoding until every rank's sequences have ended.
    """
    with _decoding(model, synced, prompt_ids.size(0) * group_size, max_new_tokens):
        uniforms = None
        greedy, banned = decoding.greedy, decoding.banned_ids
        warp = (decoding.temperature, decoding.top_k, decoding.top_p, decoding.min_p)
        if generators is not None and not greedy:
            uniforms = _group_uniforms(generators, group_size, max_new_tokens, prompt_ids.device)
        cache, logits, mask, next_pos = _prefill(model, prompt_ids, prompt_mask, group_size)
        n = logits.size(0)
        live = torch.arange(n, device=logits.device)  # rows of the N still in the model's batch
        done = torch.zeros(n, dtype=torch.bool, device=logits.device)
        eos = torch.as_tensor(eos_id, device=logits.device).view(-1)
        tokens = []
        for step in range(max_new_tokens):
            u = None if uniforms is None else uniforms[step]
            tok = _draw(logits, u, greedy, warp, banned).masked_fill(done, pad_id)
            tokens.append(tok)
            done = done | torch.isin(tok, eos)
            n_done = int(done.sum())  # the one host sync of a decode step
            finished = n_done == n
            if synced:
                finished = all_ranks(finished)
            if step == max_new_tokens - 1 or finished:
                break
            live, mask, next_pos = _compact(cache, live, done, n_done, mask, next_pos)
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits = _forward_live(model, tok, live, mask, next_pos, cache, logits)
            next_pos = next_pos + 1
        return _cut_after_eos(torch.stack(tokens, dim=1), eos)


def _decoding(model: Any, synced: bool, rows: int, steps: int) -> contextlib.ExitStack:
    """No autograd, and (unless synced) CPU linears on oneDNN (``engines.hf.onednn``) for ``steps``
    forward passes of ``rows`` rows."""
    stack = contextlib.ExitStack()
    # FSDP reuses its gather buffers, which inference tensors forbid.
    stack.enter_context(torch.no_grad() if synced else torch.inference_mode())
    if not synced:
        stack.enter_context(fast_linears(model, rows, steps))
    return stack


def _prefill(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """One forward over the P prompts, its KV cache repeated G times.

    Returns the cache, the next-token logits [N, V] float32, the attention mask [N, L] and the next
    positions [N, 1] of the N = P * G rows.
    """
    pos = positions(prompt_mask)
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    cache = output_cache(out)
    _expand_cache(cache, group_size)
    logits = out.logits[:, -1].float().repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    next_pos = pos[:, -1:].repeat_interleave(group_size, 0) + 1
    return cache, logits, mask, next_pos


def _draw(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    greedy: bool,
    warp: tuple[float, int, float, float],
    banned: Sequence[int] = (),
) -> torch.Tensor:
    """The next token [N] of every row from logits [N, V]: argmax, or a draw by uniforms u [N] or the
    global RNG, after ``filter_logits`` (``warp``: its arguments); ``banned`` ids are never drawn."""
    if banned:
        logits = logits.index_fill(-1, torch.as_tensor(banned, device=logits.device), float("-inf"))
    if greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, *warp).softmax(-1)
    return torch.multinomial(probs, 1).squeeze(1) if u is None else _inverse_cdf(probs, u)


def _forward_live(model: Any, tok, live, mask, next_pos, cache: Any, logits: torch.Tensor) -> torch.Tensor:
    """Feed the live rows (indices ``live`` [n] of tokens ``tok`` [N]) their last token, with attention
    mask [n, S] and positions [n]; returns logits [N, V] with the live rows' next ones.

    Finished rows keep stale logits: only their random draws matter, and those are masked.
    """
    out = model(
        input_ids=tok[live, None],
        attention_mask=mask,
        position_ids=next_pos,
        use_cache=True,
        **{cache_arg(): cache},
    )
    if len(live) == logits.size(0):
        return out.logits[:, -1].float()
    logits.index_copy_(0, live, out.logits[:, -1].float())
    return logits


def _cut_after_eos(ids: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [N, T] and mask [N, T]: a completion runs up to and including its first id of ``eos`` [K]."""
    is_eos = torch.isin(ids, eos)
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    # Columns past every row's end exist only when decoding kept step with other ranks: drop them.
    width = int((~after_eos).any(0).nonzero().max()) + 1
    return ids[:, :width], (~after_eos[:, :width]).long()


def _group_uniforms(
    generators: Sequence[torch.Generator], group_size: int, steps: int, device: torch.device
) -> torch.Tensor:
    """Uniforms [steps, P*G] in [0, 1): column block p (group p's rows) from generators[p]."""
    per_group = [torch.rand(steps, group_size, generator=g, device=device) for g in generators]
    return torch.cat(per_group, dim=1)


# Tokens per block of the inverse-CDF lookup: a row's draw sums V / CDF_BLOCK block totals and one
# block's cumulative sum, instead of a float64 copy and cumulative sum of all V probabilities (at
# V = 151,936 and 16 rows that was ~9 ms of a 50-100 ms decode step on 2 cores; docs/performance.md).
CDF_BLOCK = 1024


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i of probs [N, V] sampled by its uniform u[i]: the first token whose CDF exceeds u * total.

    The CDF is float64 where it decides (a float32 cumulative sum over a 150k vocabulary loses the
    low-probability tokens), built in two levels: block totals of ``CDF_BLOCK`` tokens (summed in
    float32, each block's error ~1e-7 of its own mass) accumulated in float64 locate the block holding
    u * total; that block's float64 cumulative sum, scaled to the block's total, locates the token.
    Every token's interval is its probability to float32 rounding, which the probabilities carry
    anyway; a token of probability 0 (filtered out) has an empty interval and is never returned.
    """
    n, v = probs.shape
    width = min(CDF_BLOCK, v)
    full = v // width * width
    parts = [probs[:, :full].view(n, -1, width).sum(-1).double()]
    if full < v:
        parts.append(probs[:, full:].double().sum(-1, keepdim=True))
    totals = torch.cat(parts, 1)  # [N, blocks]
    cum = totals.cumsum(-1)
    target = u.double() * cum[:, -1]
    block = torch.searchsorted(cum, target.unsqueeze(1), right=True).clamp(max=cum.size(1) - 1)  # [N, 1]
    mass = totals.gather(1, block)  # the chosen block's total
    before = (cum.gather(1, block) - mass).clamp(min=0)
    arange = torch.arange(width, device=probs.device)
    cols = block * width + arange
    p = probs.gather(1, cols.clamp(max=v - 1)).double().masked_fill(cols >= v, 0.0)  # [N, width]
    inner = p.cumsum(-1)
    inner = before + inner * (mass / inner[:, -1:])
    pos = torch.searchsorted(inner, target.unsqueeze(1), right=True)
    # Past the block's end only by rounding: its last token of positive probability instead.
    last = torch.where(p > 0, arange, -1).amax(1, keepdim=True)
    return (block * width + torch.minimum(pos, last)).squeeze(1)


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
