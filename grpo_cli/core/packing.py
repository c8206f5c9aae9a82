"""Packing completions into token-budgeted micro-batches (``train.micro_batch_tokens``): which
completions share a forward pass (``token_bins``), and how they sit in it. Pure functions of lengths
and tensors; ``models.logprobs.packed_completion_logprobs`` runs the layout through the model.

Two layouts, both without padding between sequences and with attention kept inside each sequence (a
completion token sees its prompt and its own earlier tokens, nothing else):

- ``completion_rows`` (sdpa and eager attention): each prompt runs once, as in the padded path; the
  completions are packed side by side in rows as wide as the longest one, and each row reads its
  prompts from the prompt pass's key/value cache through a prepared mask. Attention costs a row's width
  times its keys, never the whole micro-batch squared.
- ``pack_sequences`` (flash-attention): every completion after its own copy of its prompt in one row,
  position ids restarting at 0 per sequence, which the variable-length kernels read without a mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch


def token_bins(
    lengths: Sequence[int],
    groups: Sequence[int],
    prompt_lengths: Sequence[int],
    budget: int,
    bins: int | None = None,
    prompt_each: bool = False,
) -> list[list[int]]:
    """Completions 0..n-1 in micro-batches of at most ``budget`` tokens, balanced by tokens.

    lengths[i]: completion i's tokens; groups[i]: its prompt; prompt_lengths[g]: prompt g's tokens,
    paid once per micro-batch that holds any of its completions (the prompt is shared in the row:
    ``completion_rows``), or with ``prompt_each`` once per completion (a copy before each one:
    ``pack_sequences``), so a micro-batch's load is what its row really holds. Longest first, each into the micro-batch whose load after the add is smallest (a micro-batch that
    already holds the prompt pays only the completion). ``bins``: the count to use (ranks agree on
    one); None: the fewest for which every micro-batch fits the budget, a completion longer than the
    budget alone in its own. Returns each micro-batch's completions in ascending order, micro-batches
    ordered by their first completion; exactly min(``bins``, n) of them when ``bins`` is given.
    """
    n = len(lengths)
    if n == 0:
        return []
    if budget < 1:
        raise ValueError(f"budget={budget}: must be >= 1")
    order = sorted(range(n), key=lambda i: (-(lengths[i] + prompt_lengths[groups[i]]), i))

    def fill(k: int) -> tuple[list[list[int]], list[int]]:
        members: list[list[int]] = [[] for _ in range(k)]
        loads, held = [0] * k, [set() for _ in range(k)]
        for placed, i in enumerate(order):
            g = groups[i]
            adds = [
                lengths[i] + (0 if g in held[b] and not prompt_each else prompt_lengths[g]) for b in range(k)
            ]
            empty = [b for b in range(k) if not members[b]]
            # As many completions left as empty micro-batches: fill those, so none stays empty.
            choices = empty if len(empty) >= n - placed else range(k)
            b = min(choices, key=lambda c: (loads[c] + adds[c], c))
            loads[b] += adds[b]
            members[b].append(i)
            held[b].add(g)
        return members, loads

    if bins is not None:
        members, _ = fill(max(1, min(bins, n)))
    else:
        prompts = groups if prompt_each else set(groups)
        total = sum(lengths) + sum(prompt_lengths[g] for g in prompts)
        k = max(1, min(n, math.ceil(total / budget)))
        while True:
            members, loads = fill(k)
            if k == n or all(load <= budget or len(m) == 1 for load, m in zip(loads, members)):
                break
            k += 1
    out = [sorted(m) for m in members if m]
    return sorted(out, key=lambda m: m[0])


class PackedRow(NamedTuple):
    """One row of S tokens: n sequences side by side, each a completion after its own copy of its prompt.

    input_ids: [S] long; position_ids: [S] long (0 at each prompt's first token); allowed: [S, S]
    bool, query x key (causal and inside each sequence: block-diagonal); predictor: [n, T] long, the
    row position whose hidden state predicts completion token (i, t); valid: [n, T] bool.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    predictor: torch.Tensor
    valid: torch.Tensor


def pack_sequences(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> PackedRow:
    """The row of completions [n, T] (right-padded), each after its prompt [P, L] (left-padded;
    completion i continues prompt ``prompt_index[i]``), padding left out: the layout variable-length
    attention kernels (flash-attention) read from the restarting position ids alone."""
    n, T = completion_ids.shape
    lengths = completion_mask.long().sum(1).tolist()
    prompts = [prompt_ids[p][prompt_mask[p].bool()] for p in range(prompt_ids.size(0))]
    pieces: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    seq: list[int] = []  # per token: its sequence
    predictor = torch.zeros(n, T, dtype=torch.long)
    for i, p in enumerate(prompt_index.tolist()):
        prompt, m = prompts[p], lengths[i]
        pieces += [prompt, completion_ids[i, :m]]
        positions.append(torch.arange(prompt.numel() + m))
        start = len(seq) + prompt.numel()
        seq += [i] * (prompt.numel() + m)
        # Token 0 is predicted by the prompt's last token, token t by completion token t - 1.
        predictor[i, :m] = torch.arange(start - 1, start + m - 1)
    seq_t = torch.tensor(seq)
    allowed = torch.ones(len(seq), len(seq), dtype=torch.bool).tril() & (seq_t[:, None] == seq_t[None, :])
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    tensors = (torch.cat(pieces), torch.cat(positions), allowed, predictor, valid)
    return PackedRow(*(t.to(completion_ids.device) for t in tensors))


def row_fill(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Completions (``lengths[i]`` tokens) in rows of ``width`` tokens: first fit, longest first.
    Each row's completions in ascending order, rows ordered by their first completion."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


class CompletionRows(NamedTuple):
    """Completions packed in R rows of W tokens, each row reading the prompts its completions continue
    from a prefix of K prompt slots (the prompt pass's key/value cache, gathered per row).

    input_ids, position_ids: [R, W] long (pad: id 0 at position 0); prefix_index: [R, K * L] long, the
    prompt-pass column (p * L + l over [P, L]) each prefix column reads; allowed: [R, W, K * L + W] bool,
    query x (prefix, row) key; predictor: [n, T] long into [P + R * W] (the P prompts' last hidden
    states, then the rows' flattened) for completion token (i, t); valid: [n, T] bool.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    prefix_index: torch.Tensor
    allowed: torch.Tensor
    predictor: torch.Tensor
    valid: torch.Tensor


def completion_rows(
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> CompletionRows:
    """The rows of completions [n, T] (right-padded) continuing prompts [P, L] (left-padded,
    ``prompt_mask``): ``row_fill`` into rows as wide as the longest completion, so a row holds one long
    completion or several short ones side by side and no completion token is padding of another.

    A completion token attends to its prompt's real tokens in the row's prefix and to its own earlier
    tokens, nothing else; its position is its prompt's length plus its index, as if it ran alone.
    """
    device = completion_ids.device
    n, T = completion_ids.shape
    P, L = prompt_mask.shape
    lengths = completion_mask.long().sum(1).tolist()
    index = prompt_index.tolist()
    prompt_len = prompt_mask.long().sum(1).tolist()
    rows = row_fill(lengths, max(1, max(lengths, default=1)))
    slots = [list(dict.fromkeys(index[i] for i in row)) for row in rows]  # each row's prompts, in order
    K, W, R = max(len(s) for s in slots), max(1, max(lengths, default=1)), len(rows)
    ids = torch.zeros(R, W, dtype=torch.long)
    pos = torch.zeros(R, W, dtype=torch.long)
    prefix = torch.zeros(R, K * L, dtype=torch.long)
    allowed = torch.zeros(R, W, K * L + W, dtype=torch.bool)
    allowed[:, torch.arange(W), K * L + torch.arange(W)] = True  # pads see themselves (no empty softmax row)
    predictor = torch.zeros(n, T, dtype=torch.long)
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        for k, p in enumerate(slots[r]):
            prefix[r, k * L : (k + 1) * L] = p * L + torch.arange(L)
        at = 0
        for i in row:
            p, k, m = index[i], slots[r].index(index[i]), lengths[i]
            span = slice(at, at + m)
            ids[r, span] = completion_ids[i, :m].cpu()
            pos[r, span] = prompt_len[p] + torch.arange(m)
            allowed[r, span, k * L : (k + 1) * L] = prompt_mask[p].bool().cpu()
            allowed[r, span, K * L + at : K * L + at + m] = causal[:m, :m]
            # Token 0 is predicted by the prompt's last hidden state, token t by row token t - 1.
            predictor[i, :m] = torch.tensor([p, *(P + r * W + at + t for t in range(m - 1))][:m])
            at += m
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return CompletionRows(*(t.to(device) for t in (ids, pos, prefix, allowed, predictor, valid)))
