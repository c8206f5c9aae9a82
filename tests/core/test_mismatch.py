"""core.mismatch against plain-Python loops: engine weights with a lower bound (truncate, the
two-sided IcePop mask) and the sequence rejection for each statistic."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_cli.core.mismatch import SEQUENCE_STATISTICS, engine_is_weights, rejected_sequences


def _batch(B=8, T=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -2 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    eng = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[-1] = 0  # a completion without model tokens
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return old, eng, mask


def _loop_weights(old, eng, mask, cap, level, mode, low):
    out = []
    for i in range(len(old)):
        xs = [old[i][t] - eng[i][t] for t in range(len(old[i]))]
        seq = sum(x for x, m in zip(xs, mask[i]) if m)
        row = []
        for x, m in zip(xs, mask[i]):
            if not m:
                row.append(1.0)
                continue
            w = math.exp(seq if level == "sequence" else x)
            lo = 0.0 if low is None else low
            if mode == "truncate":
                row.append(min(max(w, lo), cap))
            else:
                row.append(w if lo <= w <= cap else 0.0)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("low", [None, 0.8])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weights_with_a_lower_bound_match_the_loop(level, mode, low):
    old, eng, mask = _batch()
    got = engine_is_weights(old, eng, mask, 1.25, level, mode, low)
    want = _loop_weights(old.tolist(), eng.tolist(), mask.tolist(), 1.25, level, mode, low)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    if mode == "mask" and level == "token":
        zero = got[mask] == 0
        assert zero.any() and not zero.all()
        if low is not None:  # two-sided: some tokens are out for being too small
            ratio = (old - eng).exp()[mask]
            assert (zero & (ratio < low)).any() and (zero & (ratio > 1.25)).any()


def _loop_statistic(xs, statistic):
    if statistic == "sum":
        return sum(xs)
    if statistic == "geo_mean":
        return sum(xs) / len(xs)
    return sum(math.exp(x) - 1 - x for x in xs) / len(xs)


@pytest.mark.parametrize(
    "statistic,cap,low", [("sum", 2.0, 0.5), ("geo_mean", 1.15, 0.87), ("mean_k3", 0.08, None)]
)
def test_rejection_by_each_sequence_statistic_matches_the_loop(statistic, cap, low):
    assert statistic in SEQUENCE_STATISTICS
    old, eng, mask = _batch()
    got = rejected_sequences(old, eng, mask, cap, statistic, low)
    want = []
    for i in range(len(old)):
        xs = [float(old[i, t] - eng[i, t]) for t in range(old.size(1)) if mask[i, t]]
        if not xs:
            want.append(False)  # nothing to judge: never rejected
            continue
        s = _loop_statistic(xs, statistic)
        if statistic == "mean_k3":
            want.append(s > cap)
        else:
            want.append(s > math.log(cap) or (low is not None and s < math.log(low)))
    assert got.tolist() == want
    assert any(want) and not all(want)


def test_mean_k3_takes_no_lower_bound_and_unknown_statistics_are_named():
    old, eng, mask = _batch()
    with pytest.raises(ValueError, match="divergence"):
        rejected_sequences(old, eng, mask, 0.1, "mean_k3", 0.5)
    with pytest.raises(ValueError, match="engine_is.statistic='median'"):
        rejected_sequences(old, eng, mask, 2.0, "median")
