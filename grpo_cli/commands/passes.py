"""Micro-batches and mini-batches of a rollout, and the log-prob passes over them that ``commands.update``
makes: the no-gradient reference and pi_old passes, and the per-micro-batch forward of the update.

A micro-batch is either ``train.micro_batch_size`` consecutive completions, padded to the batch's
width, each group's prompt run once (``models.logprobs.grouped_completion_logprobs``), or, with
``train.micro_batch_tokens``, a set of completions balanced by tokens and packed side by side in one
row (``core.packing``, ``models.logprobs.packed_completion_logprobs``). Every pass over a batch cuts it
the same way, so pi_old's log-probs are bit for bit the ones the update's first forward computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grpo_cli.config import DEFAULT_MICRO_BATCH_SIZE, TrainConfig
from grpo_cli.core.packing import token_bins
from grpo_cli.models.logprobs import grouped_completion_logprobs, packed_completion_logprobs, packed_layout
from grpo_cli.rollout.record import Rollout
from grpo_cli.runtime import distributed


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` of ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass(frozen=True)
class MicroBatching:
    """How a (mini-)batch is cut for its forward passes: ``size`` completions per micro-batch
    (``train.micro_batch_size``), or, with ``tokens`` > 0 (``train.micro_batch_tokens``), micro-batches
    of at most that many tokens, their completions packed side by side without padding (``core.packing``)."""

    size: int
    tokens: int = 0
    prompt_each: bool = False  # the packed layout copies the prompt before every completion (flash-attention)

    @staticmethod
    def of(micro: int | MicroBatching) -> MicroBatching:
        return micro if isinstance(micro, MicroBatching) else MicroBatching(micro)

    @staticmethod
    def of_train(tr: TrainConfig, model: Any) -> MicroBatching:
        """``train.micro_batch_tokens`` when > 0, else ``train.micro_batch_size`` (null: 64), for ``model``,
        whose attention decides what a packed row holds (``models.logprobs.packed_layout``)."""
        size, tokens = tr.micro_batch_size or DEFAULT_MICRO_BATCH_SIZE, tr.micro_batch_tokens
        return MicroBatching(size, tokens, bool(tokens) and packed_layout(model) == "sequences")

    def plan(self, rollout: Rollout) -> list[slice] | list[torch.Tensor]:
        """The micro-batches of ``rollout``: consecutive slices, or packed row sets [n_i] balanced by
        tokens, the same count on every rank (FSDP gathers weights in every forward, so ranks must make
        the same number of passes; DDP's gradient sync waits for every rank's last one)."""
        n = rollout.completion_ids.size(0)
        if not self.tokens:
            return micro_batches(n, self.size)
        G = rollout.group_size
        lengths = rollout.completion_mask.long().sum(1).tolist()
        groups = [i // G for i in range(n)]
        prompt_lengths = rollout.prompt_mask[::G].long().sum(1).tolist()
        bins = None
        if distributed.world().enabled:
            mine = len(token_bins(lengths, groups, prompt_lengths, self.tokens, prompt_each=self.prompt_each))
            most, fewest_rows = (
                distributed.all_max(torch.tensor([mine])),
                distributed.all_min(torch.tensor([n])),
            )
            bins = min(int(most), int(fewest_rows))
        bins_ = token_bins(lengths, groups, prompt_lengths, self.tokens, bins, self.prompt_each)
        return [torch.tensor(b) for b in bins_]


def micro_logps(
    runner: Callable[..., Any],
    rollout: Rollout,
    s: slice | torch.Tensor,
    temperature: float,
    entropy: str | None = None,
    packed: bool = False,
) -> Any:
    """Log-probs [n, T] of the completions ``s`` (a slice or rows [n]), each group's prompt run through the
    model once; with ``entropy`` ("metric" or "grad") the pair (log-probs, entropies [n, T]) from the same
    pass. ``packed``: the completions side by side, no padding between them
    (``models.logprobs.packed_completion_logprobs``).

    ``runner``: ``Policy.run`` or a reference runner (``models.reference``). A micro-batch may start
    or end inside a group: its prompts are those of the groups it touches.
    """
    G = rollout.group_size
    device = rollout.prompt_ids.device
    rows = torch.arange(s.start, s.stop, device=device) if isinstance(s, slice) else s.to(device)
    touched, index = torch.unique(rows // G, return_inverse=True)  # one prompt row per group touched
    prompt_ids, prompt_mask = rollout.prompt_ids[touched * G], rollout.prompt_mask[touched * G]
    if not torch.equal(prompt_ids[index], rollout.prompt_ids[rows]):  # not laid out in groups: no sharing
        prompt_ids, prompt_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]
        index = torch.arange(rows.numel(), device=device)
    ids, mask = rollout.completion_ids[s], rollout.completion_mask[s]
    if packed:
        fn = packed_completion_logprobs
        return runner(fn, prompt_ids, prompt_mask, ids, mask, index, temperature=temperature, entropy=entropy)
    return runner(
        grouped_completion_logprobs,
        prompt_ids,
        prompt_mask,
        ids,
        mask,
        temperature=temperature,
        prompt_index=index,
        entropy=entropy,
    )


def mini_batch_rows(groups: int, group_size: int, k: int) -> list[torch.Tensor] | None:
    """The rows [n] of each of ``k`` mini-batches of this rank's ``groups`` groups: group l goes to
    mini-batch l mod k. None for k = 1 (the whole batch, as before the option).

    Strided, not consecutive: a rank holds consecutive groups of the step (k divides its count), so
    global group g lands in mini-batch g mod k on any number of ranks, and each optimizer step sees the
    same groups whether the batch is split over 1 rank or 8.
    """
    if groups % k:
        raise ValueError(f"algo.steps_per_generation={k} must divide the {groups} groups of the batch")
    if k == 1:
        return None
    return [
        torch.tensor([g * group_size + j for g in range(m, groups, k) for j in range(group_size)])
        for m in range(k)
    ]


@torch.no_grad()
def logps_no_grad(
    runner: Callable[..., Any],
    rollout: Rollout,
    temperature: float,
    micro: int | MicroBatching,
    entropy: bool = False,
) -> Any:
    """Log-probs [N, T] without gradient; with ``entropy`` the pair (log-probs, entropies [N, T])."""
    micro = MicroBatching.of(micro)
    kind = "metric" if entropy else None
    plan = micro.plan(rollout)
    parts = [micro_logps(runner, rollout, s, temperature, kind, bool(micro.tokens)) for s in plan]
    if not micro.tokens:  # consecutive slices
        pairs = parts if entropy else [(p,) for p in parts]
        outs = tuple(torch.cat([pair[i] for pair in pairs]) for i in range(len(pairs[0])))
        return outs if entropy else outs[0]
    return _scatter(parts, plan, rollout.completion_ids.size(0), entropy)


def mini_batch_logps(
    runner: Callable[..., Any],
    rollout: Rollout,
    temp: float,
    micro: int | MicroBatching,
    rows: list[torch.Tensor] | None,
    entropy: bool = False,
) -> Any:
    """``logps_no_grad`` over each mini-batch's rows, cut into micro-batches as ``update`` cuts them, so
    the first mini-batch's pi_old equals its current log-probs bit for bit (ratio exactly 1). With
    ``entropy`` the pair (log-probs [N, T], entropies [N, T])."""
    if rows is None:
        return logps_no_grad(runner, rollout, temp, micro, entropy)
    parts = [logps_no_grad(runner, rollout.select(r), temp, micro, entropy) for r in rows]
    return _scatter(parts, rows, rollout.completion_ids.size(0), entropy)


def _scatter(parts: list[Any], index: list[torch.Tensor], n: int, pairs: bool) -> Any:
    """Per-part results [n_i, T] (or pairs of them) put back at their completions ``index[i]`` [n_i]
    of an [N = n, T] tensor; the index sets cover every completion once (packed bins, mini-batches)."""
    parts = parts if pairs else [(p,) for p in parts]
    outs = []
    for i in range(len(parts[0])):
        out = parts[0][i].new_zeros(n, parts[0][i].size(1))  # [N, T]
        for at, part in zip(index, parts):
            out[at.to(out.device)] = part[i]
        outs.append(out)
    return tuple(outs) if pairs else outs[0]
