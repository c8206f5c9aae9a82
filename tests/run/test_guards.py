"""Run guards on their own: counting non-finite steps, the zero-variance warning, why a run stops.

The zero-variance cadence over one unbroken streak (warn after ZERO_STD_PATIENCE steps, then every
ZERO_STD_REPEAT) is tests/test_train.py::test_zero_variance_warning_waits_then_repeats_rarely; a NaN
run stopping end to end is there too.
"""

from __future__ import annotations

import logging
import math
import signal

import pytest

from grpo_cli.config import TrainConfig
from grpo_cli.run.checkpoint import STATE_FILE, GracefulStop
from grpo_cli.run.guards import ZERO_STD_PATIENCE, ZERO_STD_REPEAT, StepGuard, stop_message, stop_reason
from grpo_cli.runtime import distributed


def _good(zero_std_frac: float = 0.0) -> dict[str, float]:
    return {"skipped": 0.0, "loss": 0.1, "grad_norm": 0.5, "zero_std_frac": zero_std_frac}


def _bad() -> dict[str, float]:
    return {"skipped": 1.0, "loss": math.nan, "grad_norm": math.inf, "zero_std_frac": 0.0}


def _tr(steps: int = 10, max_bad_steps: int = 3) -> TrainConfig:
    return TrainConfig(steps=steps, max_bad_steps=max_bad_steps)


def _stop(signum: int | None = None) -> GracefulStop:
    stop = GracefulStop()  # not entered: no handler installed, the signal is set by hand
    stop.signum = signum
    return stop


# ---------------------------------------------------------------------------- bad steps


def test_a_skipped_step_is_counted_in_the_metrics_and_warned_about():
    guard = StepGuard(max_bad_steps=3, zero_std_warn=0.9)
    metrics = _bad()
    [warning] = guard.record(7, metrics)
    assert warning == (
        "step 7: non-finite loss or gradient (loss nan, grad norm inf): update skipped "
        "(1 in a row, 1 in all; the run stops at 3 in a row)"
    )
    assert metrics["bad_steps"] == 1.0
    good = _good()
    assert guard.record(8, good) == [] and good["bad_steps"] == 1.0  # the total stays in the metric


def test_the_run_must_stop_only_after_max_bad_steps_in_a_row():
    guard = StepGuard(max_bad_steps=3, zero_std_warn=0.9)
    pattern = [_bad, _bad, _good, _bad, _bad]  # never 3 in a row: the good step resets the streak
    for step, make in enumerate(pattern, 1):
        guard.record(step, make())
        assert not guard.must_stop, step
    assert (guard.bad_total, guard.bad_streak) == (4, 2)
    [warning] = guard.record(6, _bad())
    assert "(3 in a row, 5 in all" in warning
    assert guard.must_stop


# ---------------------------------------------------------------------------- zero-variance warning


def test_a_fraction_at_the_threshold_does_not_count():
    guard = StepGuard(max_bad_steps=5, zero_std_warn=0.5)
    assert not any(guard.record(s, _good(zero_std_frac=0.5)) for s in range(1, 3 * ZERO_STD_PATIENCE))
    assert guard.zero_streak == 0


def test_a_broken_streak_waits_the_whole_patience_again():
    guard = StepGuard(max_bad_steps=5, zero_std_warn=0.9)
    fracs = [1.0] * (ZERO_STD_PATIENCE - 1) + [0.2] + [1.0] * ZERO_STD_PATIENCE
    said = {s: guard.record(s, _good(zero_std_frac=f)) for s, f in enumerate(fracs, 1)}
    # one step short of the patience, broken, then the full patience: the first warning comes
    # only at the end of the second streak, and counts that streak alone
    assert [s for s, w in said.items() if w] == [len(fracs)]
    [warning] = said[len(fracs)]
    assert warning.startswith(f"zero_std_frac above 0.9 for {ZERO_STD_PATIENCE} steps: most groups")


def test_a_restored_guard_keeps_the_uninterrupted_runs_cadence():
    straight = StepGuard(max_bad_steps=5, zero_std_warn=0.9)
    first = StepGuard(max_bad_steps=5, zero_std_warn=0.9)
    steps = range(1, 2 * ZERO_STD_REPEAT)
    metrics = {s: _bad() if s == 3 else _good(zero_std_frac=1.0) for s in steps}
    want = [s for s in steps if straight.record(s, dict(metrics[s]))]
    cut = ZERO_STD_PATIENCE + 10  # after the first warning, inside the quiet stretch
    got = [s for s in steps[:cut] if first.record(s, dict(metrics[s]))]
    resumed = StepGuard(max_bad_steps=5, zero_std_warn=0.9)
    resumed.load_state_dict(first.state_dict())
    got += [s for s in steps[cut:] if resumed.record(s, dict(metrics[s]))]
    # the skip at 3 (which also breaks the zero-variance streak), then the zero-variance warnings
    assert want == [3, 3 + ZERO_STD_PATIENCE, 3 + ZERO_STD_PATIENCE + ZERO_STD_REPEAT]
    assert got == want
    assert resumed.state_dict() == straight.state_dict()


# ---------------------------------------------------------------------------- stop_reason


def test_no_reason_to_stop_goes_on():
    assert stop_reason(StepGuard(3, 0.9), _stop(), step=4, tr=_tr()) is None


def test_too_many_bad_steps_stop_with_status_1_even_when_a_signal_came_too():
    guard = StepGuard(3, 0.9)
    for step in range(1, 4):
        guard.record(step, _bad())
    for stop in (_stop(), _stop(signal.SIGTERM)):
        reason, code = stop_reason(guard, stop, step=3, tr=_tr(max_bad_steps=3))
        assert code == 1
        assert reason.startswith("stopped: 3 steps in a row had a non-finite loss or gradient")
        assert "(train.max_bad_steps=3)" in reason


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_with_its_exit_status_unless_it_came_during_the_last_step(sig, code):
    guard = StepGuard(3, 0.9)
    assert stop_reason(guard, _stop(sig), step=4, tr=_tr(steps=10)) == (
        f"stopped by {sig.name} after step 4",
        code,
    )
    assert stop_reason(guard, _stop(sig), step=10, tr=_tr(steps=10)) is None  # just finish


def test_a_signal_on_another_rank_stops_this_one_too(monkeypatch):
    # torchrun signals every rank, not at the same instant: the ranks take the max of their signums
    monkeypatch.setattr(distributed, "all_max", lambda x: max(x, signal.SIGTERM))
    assert stop_reason(StepGuard(3, 0.9), _stop(), step=4, tr=_tr()) == (
        "stopped by SIGTERM after step 4",
        143,
    )


# ---------------------------------------------------------------------------- stop_message


def test_stop_message_names_the_last_checkpoint_and_the_resume_command(tmp_path, caplog):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_bytes(b"")
    with caplog.at_level(logging.ERROR, logger="grpo_cli"):
        code = stop_message("stopped by SIGINT after step 4", tmp_path, "grpo train train.resume=auto", 130)
    assert code == 130
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f"stopped by SIGINT after step 4; last checkpoint: {tmp_path / 'checkpoint-4'}\n"
        "resume with:\n  grpo train train.resume=auto"
    )


def test_stop_message_before_any_checkpoint_says_so(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="grpo_cli"):
        assert stop_message("stopped: 3 steps in a row", tmp_path, "grpo train", 1) == 1
    assert "stopped: 3 steps in a row; no checkpoint was written yet" in caplog.text


def test_only_rank_0_says_why_the_run_stopped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=1, size=2))
    with caplog.at_level(logging.ERROR, logger="grpo_cli"):
        assert stop_message("stopped by SIGTERM after step 4", tmp_path, "torchrun ...", 143) == 143
    assert caplog.records == []
