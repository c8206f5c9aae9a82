"""core.covariance against plain-Python loops: the covariance per token, verl's count, the top-k and
the seeded draw among the candidates."""

from __future__ import annotations

import pytest
import torch

from grpo_cli.core.covariance import clip_cov_tokens, kl_cov_tokens, selection_count, token_covariance


def _values(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return -3 * torch.rand(n, generator=gen, dtype=torch.float64), torch.randn(
        n, generator=gen, dtype=torch.float64
    )


def test_covariance_is_the_centred_product_of_log_prob_and_advantage():
    lp, adv = _values()
    mean_lp, mean_a = sum(lp.tolist()) / len(lp), sum(adv.tolist()) / len(adv)
    want = [(x - mean_lp) * (a - mean_a) for x, a in zip(lp.tolist(), adv.tolist())]
    assert torch.allclose(
        token_covariance(lp, adv), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14
    )
    assert token_covariance(lp[:0], adv[:0]).numel() == 0


@pytest.mark.parametrize("ratio,n,want", [(2e-4, 100, 1), (2e-4, 20_000, 4), (0.25, 10, 2), (0.5, 0, 0)])
def test_selection_count_is_at_least_one_token_as_verl_counts(ratio, n, want):
    assert selection_count(ratio, n) == want


def test_kl_cov_takes_the_largest_covariances_and_their_ties():
    cov = torch.tensor([0.1, 2.0, -1.0, 0.7, 2.0, 0.7 + 1e-9, 0.3], dtype=torch.float64)
    assert kl_cov_tokens(cov, 2).tolist() == [False, True, False, False, True, False, False]
    # the third largest ties (within 1e-5 relative) with the fourth: both in
    assert kl_cov_tokens(cov, 3, tie=1e-5).tolist() == [False, True, False, True, True, True, False]
    assert not kl_cov_tokens(cov, 0).any()


def test_clip_cov_draws_count_candidates_inside_the_window_reproducibly():
    lp, adv = _values(200)
    cov = token_covariance(lp, adv)
    inside = (cov > 0.2) & (cov < 1.5)
    assert int(inside.sum()) > 10
    a = clip_cov_tokens(cov, 5, 0.2, 1.5, seed=7)
    assert int(a.sum()) == 5 and inside[a].all()
    assert torch.equal(a, clip_cov_tokens(cov, 5, 0.2, 1.5, seed=7))  # the same step, the same draw
    draws = {tuple(clip_cov_tokens(cov, 5, 0.2, 1.5, seed=s).nonzero().flatten().tolist()) for s in range(20)}
    assert len(draws) > 10  # the seed moves the draw
    # fewer candidates than asked: all of them
    assert torch.equal(clip_cov_tokens(cov, 10_000, 0.2, 1.5, seed=0), inside)
    assert not clip_cov_tokens(cov, 5, 100.0, 200.0, seed=0).any()
