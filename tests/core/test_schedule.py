"""The learning-rate schedule (``train.lr_schedule``) against closed forms written out in float64,
and its resume: a scheduler rebuilt from the config and loaded with a saved state continues the
uninterrupted run's lr sequence exactly."""

from __future__ import annotations

import io
import math

import pytest
import torch

from grpo_cli.core.schedule import LR_SCHEDULES, schedule

LR, WARM, TOTAL, FLOOR = 3e-4, 3, 20, 0.1


def _lrs(sched_kind: str, steps: int, warm: int = WARM, total: int = TOTAL, floor: float = FLOOR):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = schedule(opt, warm, sched_kind, total, floor)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: moves nothing, keeps torch's step-order check quiet
        sched.step()
    return out


def _closed_form(kind: str, s: int) -> float:
    """lr at scheduler step s: LR (s + 1) / (WARM + 1) during warm-up; then with x = (s - WARM) /
    (TOTAL - WARM), at most 1, LR (FLOOR + (1 - FLOOR)(1 - x)) (linear) or
    LR (FLOOR + (1 - FLOOR)(1 + cos(pi x)) / 2) (cosine)."""
    if s < WARM:
        return LR * (s + 1) / (WARM + 1)
    x = min((s - WARM) / (TOTAL - WARM), 1.0)
    if kind == "linear":
        return LR * (FLOOR + (1 - FLOOR) * (1 - x))
    return LR * (FLOOR + (1 - FLOOR) * (1 + math.cos(math.pi * x)) / 2)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decays_follow_the_closed_form_in_float64(kind):
    got = _lrs(kind, TOTAL + 4)
    for s in (0, 1, 2, 3, 4, 7, 11, 19, 20, 23):
        assert got[s] == pytest.approx(_closed_form(kind, s), rel=1e-12, abs=0), s
    # warm-up rises to lr, the decay falls strictly to the floor, reached after the last step only
    assert got[WARM] == pytest.approx(LR, rel=1e-12)
    decay = got[WARM : TOTAL + 1]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert got[TOTAL - 1] > LR * FLOOR and got[TOTAL] == pytest.approx(LR * FLOOR, rel=1e-12)
    assert got[TOTAL + 3] == pytest.approx(LR * FLOOR, rel=1e-12)  # held past train.steps


def test_cosine_and_linear_differ_and_meet_at_the_middle():
    lin, cos = _lrs("linear", TOTAL), _lrs("cosine", TOTAL, total=TOTAL)
    mid = WARM + (TOTAL - WARM) // 2
    assert lin[WARM + 2] < cos[WARM + 2]  # cosine holds high first
    assert abs(lin[mid] - cos[mid]) < 0.05 * LR


@pytest.mark.parametrize("warm", [0, 1, 4])
def test_constant_is_the_warm_up_then_lr_of_before(warm):
    """The default: the factor min(1, (s + 1) / (warm + 1)) (1 without warm-up), bit for bit."""
    got = _lrs("constant", 8, warm=warm)
    assert got == [LR * (min(1.0, (s + 1) / (warm + 1)) if warm else 1.0) for s in range(8)]


def test_the_floor_is_a_fraction_of_lr_and_zero_by_default():
    assert _lrs("linear", TOTAL + 1, floor=0.0)[TOTAL] == 0.0
    assert _lrs("cosine", TOTAL + 1, floor=0.5)[TOTAL] == pytest.approx(LR / 2, rel=1e-12)
    assert set(LR_SCHEDULES) == {"constant", "linear", "cosine"}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_a_resumed_scheduler_continues_the_same_lr_sequence(kind):
    """7 steps, the state through torch.save as a checkpoint stores it, a fresh scheduler from the
    same config loads it: the next 15 lrs equal the uninterrupted run's."""
    straight = _lrs(kind, 22)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = schedule(opt, WARM, kind, TOTAL, FLOOR)
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    resumed = schedule(opt2, WARM, kind, TOTAL, FLOOR)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    lrs = []
    for _ in range(15):
        lrs.append(resumed.get_last_lr()[0])
        opt2.step()
        resumed.step()
    assert lrs == straight[7:]
