"""Prefix-shared rollout: same tokens as ``model.generate``, consistent log-probs, ragged prompts."""

from __future__ import annotations

import pytest
import torch
from helpers import encode_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from grpo_cli.engines.hf.decode import filter_logits, sample_group
from grpo_cli.models.logprobs import completion_logprobs

PROMPTS = ["Calculate 1 + 2\nAnswer: ", "Calculate 9 * 8 - 7\nAnswer: ", "x"]


@pytest.fixture(scope="module")
def model_and_tok(random_model_dir):
    tok = AutoTokenizer.from_pretrained(random_model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(random_model_dir).eval()
    return model, tok


def _hf_generate(model, ids, mask, G, **kw):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        num_return_sequences=G,
        pad_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return out[:, ids.size(1) :]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.9)]
)
def test_filter_logits_matches_generate_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 273) * 3
    expected = logits.clone()
    for warper in [
        TemperatureLogitsWarper(temperature),
        TopKLogitsWarper(top_k) if top_k else None,
        TopPLogitsWarper(top_p) if top_p < 1 else None,
    ]:
        if warper is not None:
            expected = warper(None, expected)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(got[finite], expected[finite])


def test_greedy_equals_generate_token_for_token(model_and_tok):
    model, tok = model_and_tok
    ids, mask = encode_prompts(tok, PROMPTS, False, torch.device("cpu"))
    assert (mask[:, 0] == 0).any(), "prompts should be ragged so left padding is exercised"
    ours, our_mask = sample_group(model, ids, mask, 2, 12, 0, 0, greedy=True)
    theirs = _hf_generate(model, ids, mask, 1, do_sample=False).repeat_interleave(2, 0)
    theirs = torch.nn.functional.pad(theirs, (0, ours.size(1) - theirs.size(1)), value=0)
    assert torch.equal(ours * our_mask, theirs[:, : ours.size(1)] * our_mask)
    assert torch.equal(ours[0], ours[1]), "greedy copies of one prompt must agree"


def test_sampling_matches_generate_for_the_same_seed(model_and_tok):
    # Same warpers, same RNG draws in the same order: the same tokens, although our rollout prefills
    # each prompt once and generate prefills G copies.
    model, tok = model_and_tok
    ids, mask = encode_prompts(tok, PROMPTS, False, torch.device("cpu"))
    torch.manual_seed(123)
    ours, our_mask = sample_group(model, ids, mask, 4, 12, 0, 0, temperature=0.9, top_k=30, top_p=0.95)
    torch.manual_seed(123)
    theirs = _hf_generate(model, ids, mask, 4, do_sample=True, temperature=0.9, top_k=30, top_p=0.95)
    width = min(ours.size(1), theirs.size(1))
    assert torch.equal((ours * our_mask)[:, :width], (theirs[:, :width] * our_mask[:, :width]))


def _sample_with_logprobs(*args, **kwargs):
    """``sample_group``'s ids and mask, and the log-prob [N, T] of each sampled token under the
    temperature-scaled (unfiltered) distribution the sampler drew from, recorded at its
    ``filter_logits`` call (finished rows hold their last logits there, as in the sampler)."""
    from grpo_cli.engines.hf import decode as rollout

    real, seen = rollout.filter_logits, []

    def recording(logits, temperature, top_k, top_p):
        seen.append(torch.log_softmax(logits / temperature, -1))
        return real(logits, temperature, top_k, top_p)

    rollout.filter_logits = recording
    try:
        ids, mask = sample_group(*args, **kwargs)
    finally:
        rollout.filter_logits = real
    logps = [step.gather(1, ids[:, t, None]).squeeze(1) for t, step in enumerate(seen[: ids.size(1)])]
    return ids, mask, torch.stack(logps, dim=1)


def _assert_matches_a_plain_forward(model, ids, mask, G, c_ids, c_mask, sampled_lp, temperature):
    """The sampled tokens' log-probs [N, T] equal a plain forward's over prompt + completion."""
    full = torch.cat([ids.repeat_interleave(G, 0), c_ids], 1)
    full_mask = torch.cat([mask.repeat_interleave(G, 0), c_mask], 1)
    with torch.no_grad():
        recomputed = completion_logprobs(model, full, full_mask, ids.size(1), temperature=temperature)
    m = c_mask.bool()
    torch.testing.assert_close(recomputed[m], sampled_lp[m], atol=2e-5, rtol=1e-5)


def test_rollout_logprobs_match_a_plain_forward(model_and_tok):
    model, tok = model_and_tok
    ids, mask = encode_prompts(tok, PROMPTS, False, torch.device("cpu"))
    torch.manual_seed(0)
    c_ids, c_mask, sampled_lp = _sample_with_logprobs(model, ids, mask, 3, 10, 0, 0, temperature=0.8)
    _assert_matches_a_plain_forward(model, ids, mask, 3, c_ids, c_mask, sampled_lp, temperature=0.8)
    m = c_mask.bool()
    # Ragged prompts: every sequence ends at its first EOS, nothing counted after it.
    ends = (c_ids == 0) & m
    assert (ends.sum(1) <= 1).all()


def test_seeded_draws_follow_the_filtered_distribution():
    """The seeded path's inverse-CDF draw: frequencies match the probabilities, filtered tokens never appear."""
    from grpo_cli.engines.hf.decode import _inverse_cdf

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2
    probs = filter_logits(logits, 0.8, 20, 0.9).softmax(-1)  # zeros outside top-k / top-p
    n = 200_000
    rows = probs.repeat_interleave(n, 0)
    toks = _inverse_cdf(rows, torch.rand(3 * n)).view(3, n)
    for r in range(3):
        freq = torch.bincount(toks[r], minlength=50).double() / n
        p = probs[r].double()
        assert (freq[p == 0] == 0).all()
        # Within 5 standard errors of a binomial proportion, token by token.
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


@pytest.mark.parametrize("vocab", [50, 1024, 1025, 3000, 20_000])
def test_blocked_inverse_cdf_draws_the_one_level_float64_cdfs_token(vocab):
    """The two-level lookup (block totals, then one block) returns the token a float64 cumulative sum
    over the whole row would, for row widths around the block size, filtered rows and uniforms at
    both ends of [0, 1); never a token of probability 0."""
    from grpo_cli.engines.hf.decode import CDF_BLOCK, _inverse_cdf

    def one_level(probs, u):
        cdf = probs.double().cumsum(-1)
        target = (u.double() * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.size(-1) - 1)

    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=gen) * 3
    probs = torch.cat([logits[:32].softmax(-1), filter_logits(logits[32:], 0.7, 40, 0.9).softmax(-1)])
    if vocab > CDF_BLOCK:  # a whole block of zeros, the last, before a positive tail
        probs[:, CDF_BLOCK - 10 : CDF_BLOCK] = 0
    u = torch.rand(64, generator=gen)
    u[:4] = torch.tensor([0.0, 1e-12, 1 - 1e-12, 1 - 2**-24])
    toks = _inverse_cdf(probs, u)
    assert torch.equal(toks, one_level(probs, u))
    assert (probs.gather(1, toks[:, None]) > 0).all()


def test_seeded_sampling_is_reproducible_and_matches_its_logprobs(model_and_tok):
    from grpo_cli.engines.hf.decode import prompt_generators

    model, tok = model_and_tok
    ids, mask = encode_prompts(tok, PROMPTS, False, torch.device("cpu"))
    seeds = [5, 6, 7]
    runs = [
        _sample_with_logprobs(
            model, ids, mask, 4, 10, 0, 0, temperature=0.8, generators=prompt_generators(seeds, ids.device)
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    c_ids, c_mask, sampled_lp = runs[0]
    _assert_matches_a_plain_forward(model, ids, mask, 4, c_ids, c_mask, sampled_lp, temperature=0.8)


@pytest.mark.parametrize("seeded", [False, True])
def test_dropping_finished_rows_changes_no_token(model_and_tok, monkeypatch, seeded):
    """Finished rows leaving the decoding batch (after every finish, or never) give the same tokens."""
    from grpo_cli.engines.hf import decode as rollout
    from grpo_cli.engines.hf.decode import prompt_generators

    model, tok = model_and_tok
    ids, mask = encode_prompts(tok, PROMPTS, False, torch.device("cpu"))
    probe, _ = sample_group(model, ids, mask, 1, 12, eos_id=-1, pad_id=0, greedy=True)
    eos = int(probe[0, 2])  # prompt 0's third greedy token: at a low temperature its rows end early
    runs = {}
    for name, fraction in (("never", 2.0), ("always", 1e-9)):
        monkeypatch.setattr(rollout, "COMPACT_FRACTION", fraction)
        torch.manual_seed(1)
        gens = prompt_generators([1, 2, 3], ids.device) if seeded else None
        runs[name] = _sample_with_logprobs(model, ids, mask, 4, 12, eos, 0, temperature=0.05, generators=gens)
    (a_ids, a_mask, a_lp), (b_ids, b_mask, b_lp) = runs["never"], runs["always"]
    assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    m = a_mask.bool()
    torch.testing.assert_close(a_lp[m], b_lp[m], atol=1e-5, rtol=1e-5)
    lengths = a_mask.sum(1)
    assert lengths.min() < lengths.max()  # ragged: rows were dropped while others decoded on
