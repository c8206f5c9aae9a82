"""Token-budgeted micro-batches and the packed row's layout (``core.packing``), checked against
definitions written out pair by pair."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grpo_cli.core.packing import completion_rows, pack_sequences, row_fill, token_bins


def _load(members, lengths, groups, prompt_lengths):
    return sum(lengths[i] for i in members) + sum(prompt_lengths[g] for g in {groups[i] for i in members})


@pytest.mark.parametrize("seed", range(5))
def test_bins_hold_every_completion_once_within_the_budget_and_balanced(seed):
    rng = random.Random(seed)
    G, P = 4, 6
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(60, 200)]) for _ in range(G * P)]
    groups = [i // G for i in range(G * P)]
    prompt_lengths = [rng.randint(5, 30) for _ in range(P)]
    budget = 400
    bins = token_bins(lengths, groups, prompt_lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(G * P))
    assert all(b == sorted(b) for b in bins)
    loads = [_load(b, lengths, groups, prompt_lengths) for b in bins]
    assert max(loads) <= budget
    total = sum(lengths) + sum(prompt_lengths)
    assert len(bins) >= math.ceil(total / budget)
    # balanced: longest first into the emptiest leaves no micro-batch a whole largest item above another
    biggest = max(length + prompt_lengths[g] for length, g in zip(lengths, groups))
    assert max(loads) - min(loads) <= biggest


def test_a_shared_prompt_is_paid_once_per_micro_batch():
    # one group of 4 one-token completions after a 10-token prompt: 14 tokens, one micro-batch
    assert token_bins([1, 1, 1, 1], [0, 0, 0, 0], [10], budget=14) == [[0, 1, 2, 3]]
    assert len(token_bins([1, 1, 1, 1], [0, 0, 0, 0], [10], budget=13)) == 2


def test_a_completion_over_the_budget_goes_alone():
    bins = token_bins([50, 3, 4], [0, 1, 1], [2, 2], budget=20)
    assert [0] in bins and sorted(i for b in bins for i in b) == [0, 1, 2]


@pytest.mark.parametrize("count", [1, 3, 5, 9])
def test_a_given_count_gives_exactly_that_many_non_empty_micro_batches(count):
    # ranks agree on one count: a rank with little work still makes that many passes (at most n)
    lengths, groups = [100, 1, 1, 1, 1], [0, 0, 0, 0, 0]
    bins = token_bins(lengths, groups, [50], budget=1000, bins=count)
    assert len(bins) == min(count, 5) and all(bins)


PROMPTS = {0: [11, 12, 13], 1: [21, 22]}
COMPLETIONS = [[31, 32], [41], [51, 52, 53], [61]]
INDEX = [0, 0, 1, 1]


def _batch():
    # prompts of 3 and 2 real tokens (left-padded to 4), completions of 2, 1, 3 and 1 tokens (padded to 3)
    prompt_ids = torch.tensor([[0, 11, 12, 13], [0, 0, 21, 22]])
    completion_ids = torch.tensor([[31, 32, 0], [41, 0, 0], [51, 52, 53], [61, 0, 0]])
    return (
        prompt_ids,
        (prompt_ids != 0).long(),
        completion_ids,
        (completion_ids != 0).long(),
        torch.tensor(INDEX),
    )


def test_rows_are_filled_longest_first_to_the_width():
    assert row_fill([3, 1, 2, 2, 1], 3) == [[0], [1, 2], [3, 4]]
    assert row_fill([5], 3) == [[0]]  # wider than a row: alone


def test_packed_sequences_are_block_diagonal():
    row = pack_sequences(*_batch())
    want = [11, 12, 13, 31, 32, 11, 12, 13, 41, 21, 22, 51, 52, 53, 21, 22, 61]
    assert row.input_ids.tolist() == want
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]
    ends = [4, 8, 13, 16]  # the row position of each completion's last token
    for i, comp in enumerate(COMPLETIONS):
        # from its last token a completion sees exactly its prompt and itself, in order
        assert row.input_ids[row.allowed[ends[i]]].tolist() == PROMPTS[INDEX[i]] + comp
        for t in range(len(comp)):  # the predictor of token t is the token before it
            want_prev = PROMPTS[INDEX[i]][-1] if t == 0 else comp[t - 1]
            assert row.input_ids[row.predictor[i, t]] == want_prev
    assert not row.allowed.triu(1).any()


def test_completion_rows_read_only_their_prompt_and_themselves():
    prompt_ids, prompt_mask, completion_ids, completion_mask, index = _batch()
    rows = completion_rows(prompt_mask, completion_ids, completion_mask, index)
    # width 3 (the longest): [2] alone, then [0, 1] (2 + 1), then [3] (1)
    assert rows.input_ids.tolist() == [[31, 32, 41], [51, 52, 53], [61, 0, 0]]
    K, L = rows.prefix_index.size(1) // 4, 4
    assert K == 1  # each row's completions continue one prompt here (K: the most prompts a row reads)
    prompt_flat = prompt_ids.flatten()
    keys = torch.cat([prompt_flat[rows.prefix_index], rows.input_ids], 1)  # each row's key tokens
    where = {0: (0, 0), 1: (0, 2), 2: (1, 0), 3: (2, 0)}  # completion -> (row, offset)
    for i, comp in enumerate(COMPLETIONS):
        r, at = where[i]
        last = rows.allowed[r, at + len(comp) - 1]
        assert keys[r][last].tolist() == PROMPTS[INDEX[i]] + comp
        assert rows.position_ids[r, at : at + len(comp)].tolist() == [
            len(PROMPTS[INDEX[i]]) + t for t in range(len(comp))
        ]
        hidden_tokens = torch.cat(
            [prompt_ids[:, -1], rows.input_ids.flatten()]
        )  # what each source reads last
        for t in range(len(comp)):
            want_prev = PROMPTS[INDEX[i]][-1] if t == 0 else comp[t - 1]
            assert hidden_tokens[rows.predictor[i, t]] == want_prev
    # the padding of the last row sees only itself: no empty softmax row, no real key
    assert rows.allowed[2, 1].sum() == 1 and rows.allowed[2, 1, K * L + 1]


def test_an_empty_completion_takes_no_place():
    prompt_ids, prompt_mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    completion_ids = torch.tensor([[7, 8], [0, 0]])
    args = (completion_ids, (completion_ids != 0).long(), torch.tensor([0, 0]))
    row = pack_sequences(prompt_ids, prompt_mask, *args)
    assert row.input_ids.tolist() == [5, 6, 7, 8, 5, 6] and not row.valid[1].any()
    rows = completion_rows(prompt_mask, *args)
    assert rows.input_ids.tolist() == [[7, 8]] and not rows.valid[1].any()


@pytest.mark.parametrize("seed", range(5))
def test_the_flash_layouts_rows_hold_at_most_the_budget(seed):
    """With ``prompt_each`` (the flash-attention layout: a copy of the prompt before every completion)
    each micro-batch's real row, as ``pack_sequences`` builds it, fits the budget; charged the shared
    way (one prompt per micro-batch) the same rows overflow it."""
    rng = random.Random(seed)
    G, P, L, T = 4, 3, 30, 12
    lengths = [rng.randint(1, T) for _ in range(G * P)]
    groups = [i // G for i in range(G * P)]
    prompt_lengths = [rng.randint(15, L) for _ in range(P)]
    prompt_ids = torch.zeros(P, L, dtype=torch.long)
    prompt_mask = torch.tensor([[0] * (L - n) + [1] * n for n in prompt_lengths])
    completion_ids = torch.ones(G * P, T, dtype=torch.long)
    completion_mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    budget = 80

    def widths(bins):
        return [
            pack_sequences(
                prompt_ids, prompt_mask, completion_ids[b], completion_mask[b], torch.tensor(groups)[b]
            ).input_ids.numel()
            for b in bins
        ]

    honest = token_bins(lengths, groups, prompt_lengths, budget, prompt_each=True)
    assert sorted(i for b in honest for i in b) == list(range(G * P))
    assert max(widths(honest)) <= budget
    assert max(widths(token_bins(lengths, groups, prompt_lengths, budget))) > budget
