"""Prefix-shared rollout: same tokens as ``model.generate``, consistent log-probs, ragged prompts."""

from __future__ import annotations

import pytest
import torch
from helpers import encode_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpo_cli.engines import Decoding
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
    ours, our_mask = sample_group(model, ids, mask, 2, 12, 0, 0, decoding=Decoding(greedy=True))
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
    ours, our_mask = sample_group(
        model,
        ids,
        mask,
        4,
        12,
        0,
        0,
        decoding=Decoding(temperature=0.9, top_k=30, top_p=0.95),
    )
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

    def recording(logits, temperature, top_k, top_p, min_p=0.0):
        seen.append(torch.log_softmax(logits / temperature, -1))
        return real(logits, temperature, top_k, top_p, min_p)

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
    c_ids, c_mask, sampled_lp = _sample_with_logprobs(
        model, ids, mask, 3, 10, 0, 0, decoding=Decoding(temperature=0.8)
    )
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
            model,
            ids,
            mask,
            4,
            10,
            0,
            0,
            decoding=Decoding(temperature=0.8),
            generators=prompt_generators(seeds, ids.device),
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
    probe, _ = sample_group(model, ids, mask, 1, 12, eos_id=-1, pad_id=0, decoding=Decoding(greedy=True))
    eos = int(probe[0, 2])  # prompt 0's third greedy token: at a low temperature its rows end early
    runs = {}
    for name, fraction in (("never", 2.0), ("always", 1e-9)):
        monkeypatch.setattr(rollout, "COMPACT_FRACTION", fraction)
        torch.manual_seed(1)
        gens = prompt_generators([1, 2, 3], ids.device) if seeded else None
        runs[name] = _sample_with_logprobs(
            model, ids, mask, 4, 12, eos, 0, decoding=Decoding(temperature=0.05), generators=gens
        )
    (a_ids, a_mask, a_lp), (b_ids, b_mask, b_lp) = runs["never"], runs["always"]
    assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    m = a_mask.bool()
    torch.testing.assert_close(a_lp[m], b_lp[m], atol=1e-5, rtol=1e-5)
    lengths = a_mask.sum(1)
    assert lengths.min() < lengths.max()  # ragged: rows were dropped while others decoded on


# ---------------------------------------------------------------------------- min-p (rollout.min_p)


def _min_p_support(logits: torch.Tensor, temperature: float, min_p: float) -> torch.Tensor:
    """The tokens min-p keeps [B, V], from the rule in float64: p_i >= min_p * max_j p_j after temperature."""
    p = torch.softmax(logits.double() / temperature, -1)
    return p >= min_p * p.amax(-1, keepdim=True)


def test_min_p_keeps_a_probe_distributions_tokens_above_the_fraction_of_the_top_one():
    # p = [0.40, 0.25, 0.15, 0.10, 0.06, 0.04]; min_p 0.2: the floor is 0.08, so 0.06 and 0.04 go.
    logits = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]]).log()
    got = filter_logits(logits, 1.0, 0, 1.0, 0.2)
    assert torch.isfinite(got).tolist() == [[True, True, True, True, False, False]]
    assert torch.equal(got[:, :4], logits[:, :4])  # the kept logits untouched: renormalised by softmax
    # temperature first: at 2.0 the probabilities flatten (p ~ sqrt), the floor keeps all but the last
    assert torch.isfinite(filter_logits(logits, 2.0, 0, 1.0, 0.35)).tolist() == [[True] * 5 + [False]]
    assert torch.equal(
        _min_p_support(logits, 2.0, 0.35), torch.isfinite(filter_logits(logits, 2.0, 0, 1.0, 0.35))
    )


@pytest.mark.parametrize("temperature,min_p", [(1.0, 0.05), (0.7, 0.2), (1.5, 0.5), (1.3, 1.0)])
def test_min_p_support_is_the_float64_rule_and_generates_warper(temperature, min_p):
    """On random logits the kept support equals the float64 rule and transformers' MinPLogitsWarper
    (with top-k, which commutes with it); the most likely token is always kept."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 273, generator=gen) * 3
    p = torch.softmax(logits.double() / temperature, -1)
    top = p.amax(-1, keepdim=True)
    near = (((p - min_p * top).abs() < 1e-6) & (p < top)).any()  # the top token is kept at any min_p
    assert not near, "a probability on the floor: the float32/float64 comparison could differ"
    got = filter_logits(logits, temperature, 0, 1.0, min_p)
    assert torch.equal(torch.isfinite(got), _min_p_support(logits, temperature, min_p))
    assert torch.isfinite(got).sum(-1).min() >= 1
    assert (~torch.isfinite(got)).any()  # the probe removes something
    theirs = MinPLogitsWarper(min_p)(
        None, TopKLogitsWarper(40)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    )
    ours = filter_logits(logits, temperature, 40, 1.0, min_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_min_p_zero_changes_nothing():
    logits = torch.randn(4, 100) * 2
    for warp in [(1.0, 0, 1.0), (0.7, 10, 0.9)]:
        assert torch.equal(filter_logits(logits, *warp, 0.0), filter_logits(logits, *warp))


def test_seeded_min_p_sampling_is_reproducible_and_stays_in_the_kept_support(tiny_model_path):
    """The seeded inverse-CDF path with min-p on the embedded tiny model (a random model's flat
    distributions would keep everything): the same seeds give the same tokens, every sampled token is
    inside the support min-p kept at its step, and the filter did remove tokens there."""
    from grpo_cli.engines.hf import decode
    from grpo_cli.engines.hf.decode import prompt_generators

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    ids, mask = encode_prompts(tok, PROMPTS, False, torch.device("cpu"))
    real, kept = decode.filter_logits, []

    def recording(*args):
        out = real(*args)
        kept.append(torch.isfinite(out))
        return out

    def draw(record: bool):
        gens = prompt_generators([11, 12, 13], torch.device("cpu"))
        decode.filter_logits = recording if record else real
        try:
            return sample_group(
                model,
                ids,
                mask,
                4,
                10,
                0,
                0,
                decoding=Decoding(temperature=1.4, min_p=0.1),
                generators=gens,
            )
        finally:
            decode.filter_logits = real

    (a, a_mask), (b, b_mask) = draw(True), draw(False)
    assert torch.equal(a, b) and torch.equal(a_mask, b_mask)
    for t in range(a.size(1)):
        live = a_mask[:, t].bool()
        assert kept[t][live].gather(1, a[live, t, None]).all(), t
    assert min(float((~k).float().mean()) for k in kept) > 0.01  # min-p removed tokens at every step


def test_inverse_cdf_draws_follow_the_min_p_filtered_distribution():
    from grpo_cli.engines.hf.decode import _inverse_cdf

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 60, generator=gen) * 2
    probs = filter_logits(logits, 1.2, 0, 1.0, 0.1).softmax(-1)
    n = 100_000
    toks = _inverse_cdf(probs.repeat_interleave(n, 0), torch.rand(2 * n, generator=gen)).view(2, n)
    for r in range(2):
        freq = torch.bincount(toks[r], minlength=60).double() / n
        p = probs[r].double()
        assert (p == 0).sum() > 10 and (freq[p == 0] == 0).all()
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()
