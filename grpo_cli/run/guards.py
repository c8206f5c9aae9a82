"""Run guards of ``grpo train``: non-finite steps, the zero-variance warning, and why a run stops.

- a step whose loss or gradient norm is not finite is not applied (``update`` reports ``skipped``);
  ``StepGuard`` counts them (``bad_steps``) and after ``train.max_bad_steps`` in a row the run stops
  (exit status 1);
- a fraction of zero-variance groups above ``train.zero_std_warn`` for ``ZERO_STD_PATIENCE`` steps
  in a row is warned about, then at most once every ``ZERO_STD_REPEAT`` steps while it lasts;
- the first Ctrl-C / SIGTERM finishes the step, saves and stops (``stop_reason``; exit 130 / 143).
- a checkpoint that cannot be written (``checkpoint.SaveFailed``) stops the run too (exit 74), with the
  same ``stop_message``.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from grpo_cli.config import TrainConfig
from grpo_cli.run import checkpoint
from grpo_cli.runtime import distributed

log = logging.getLogger("grpo_cli")

ZERO_STD_PATIENCE, ZERO_STD_REPEAT = 5, 50


class RunStopped(SystemExit):
    """Training stopped early (a signal, too many bad steps); ``code`` is the process exit status."""


@dataclass
class StepGuard:
    """Counts non-finite steps and watches the zero-variance fraction; saved in every checkpoint."""

    max_bad_steps: int
    zero_std_warn: float
    bad_total: int = 0
    bad_streak: int = 0
    zero_streak: int = 0
    last_zero_warning: int = -(10**9)

    def record(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Count this step (adds ``bad_steps`` to ``metrics``); returns the warnings to show."""
        warnings = []
        if metrics["skipped"]:
            self.bad_total, self.bad_streak = self.bad_total + 1, self.bad_streak + 1
            warnings.append(
                f"step {step}: non-finite loss or gradient (loss {metrics['loss']:.3g}, grad norm "
                f"{metrics['grad_norm']:.3g}): update skipped ({self.bad_streak} in a row, "
                f"{self.bad_total} in all; the run stops at {self.max_bad_steps} in a row)"
            )
        else:
            self.bad_streak = 0
        metrics["bad_steps"] = float(self.bad_total)
        self.zero_streak = self.zero_streak + 1 if metrics["zero_std_frac"] > self.zero_std_warn else 0
        if self.zero_streak >= ZERO_STD_PATIENCE and step - self.last_zero_warning >= ZERO_STD_REPEAT:
            self.last_zero_warning = step
            warnings.append(
                f"zero_std_frac above {self.zero_std_warn} for {self.zero_streak} steps: most groups "
                "have equal rewards and give no gradient; try algo.dynamic_sampling=true (algo=dapo), "
                "a larger algo.group_size, or data of a difficulty the model can sometimes solve"
            )
        return warnings

    @property
    def must_stop(self) -> bool:
        return self.bad_streak >= self.max_bad_steps

    def state_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("bad_total", "bad_streak", "zero_streak", "last_zero_warning")}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def stop_reason(
    guard: StepGuard, stop: checkpoint.GracefulStop, step: int, tr: TrainConfig
) -> tuple[str, int] | None:
    """Why the run must stop after this step, and its exit status; None to go on."""
    if guard.must_stop:
        return (
            f"stopped: {guard.bad_streak} steps in a row had a non-finite loss or gradient "
            f"(train.max_bad_steps={tr.max_bad_steps}); lower train.lr or check the rewards",
            1,
        )
    # torchrun passes a signal to every rank, but not at the same instant: agree on it.
    signum = int(distributed.all_max(stop.signum or 0))
    if signum and step < tr.steps:  # a signal during the last step: just finish
        return f"stopped by {signal.Signals(signum).name} after step {step}", checkpoint.EXIT_CODES.get(
            signum, 1
        )
    return None


def stop_message(reason: str, run_path: Path, resume_cmd: str, code: int) -> int:
    """Say why the run stopped and how to continue it (on stderr, from rank 0); returns the exit status."""
    if not distributed.world().is_main:
        return code
    found = checkpoint.list_checkpoints(run_path)
    where = f"last checkpoint: {found[-1]}" if found else "no checkpoint was written yet"
    log.error("%s; %s\nresume with:\n  %s", reason, where, resume_cmd)
    return code
