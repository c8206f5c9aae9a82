"""Rollouts generated ahead (``rollout.max_staleness`` = S >= 1): the next batches are sampled on the
servers while the current one trains.

    grpo train rollout.engine=vllm-server rollout.servers=[...] rollout.max_staleness=1

The schedule is fixed, not a race: at step k (weights of version k - 1, the optimizer steps done)
the generation of step k + S's batch starts on a background thread, the policy trains on step k's
batch (sampled by version k - 1 - S, or version 0 for the first S steps), and before the weights are
synced the trainer waits for that generation to finish. So a step's batch lags by exactly
min(k - 1, S) versions, whatever the timing; two runs with the same seed train on the same samples,
and a checkpoint (taken between steps, when nothing is in flight) holds the S pending batches, which
a resumed run trains on exactly as the uninterrupted one did.

The last step of a run starts no generation (nothing would train on it) and does not wait for one;
a finished run that is resumed with more ``train.steps`` therefore samples its next batch with the
final weights, not the ones an uninterrupted longer run would have used.

Timings: the trainer's wait for its batches (``take``'s fill-up plus ``finish``'s wait) is what the
step reports as ``gen_time``, as in the on-policy step; ``server_gen_time`` is how long the
background generation itself took (the servers' work, overlapped with the update).

A pending batch older than S versions (a run resumed with a smaller ``rollout.max_staleness``) is
dropped, its groups counted in ``dropped_groups``, and replaced by a fresh one.

The loss corrects for the lag with ``algo.engine_is``: pi_old is the trainer's own log-prob at the
start of the step (the proximal policy) and w = pi_old / mu (mu: the servers' log-probs, from the
weights that sampled) weights each surrogate (``core.loss``).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from grpo_cli.rollout.batch import BatchSource, StepBatch, roll_out_batch


@dataclass
class Pending:
    batch: StepBatch
    version: int  # optimizer steps applied to the weights that sampled it
    gen_time: float  # seconds its generation (and scoring) took


class RolloutsAhead:
    """The S batches ahead of training and the one in flight; ``take`` and ``finish`` bracket an update."""

    def __init__(self, source: BatchSource, staleness: int):
        self.source, self.staleness = source, staleness
        self.pending: deque[Pending] = deque()
        self.flight: Future | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grpo-ahead")
        self.launched = 0.0

    def _generate(self, version: int) -> Pending:
        t0 = time.perf_counter()
        batch = roll_out_batch(self.source)
        return Pending(batch, version, time.perf_counter() - t0)

    def take(self, version: int, launch: bool = True) -> tuple[StepBatch, dict[str, float]]:
        """The batch to train on with weights of ``version``, and its metrics; starts the generation
        of the batch S steps ahead (sampled by these weights) in the background unless ``launch`` is
        False (the run's last step)."""
        assert self.flight is None, "take() twice without finish()"
        dropped, t_sync = 0, 0.0
        while self.pending and version - self.pending[0].version > self.staleness:
            dropped += (
                self.pending.popleft().batch.trained.completion_ids.size(0) // self.source.algo.group_size
            )
        t0 = time.perf_counter()
        while len(self.pending) < self.staleness:  # the run's first steps (or after drops): fill up now
            self.pending.append(self._generate(version))
        t_sync = time.perf_counter() - t0
        head = self.pending.popleft()
        if launch:
            self.flight = self.pool.submit(self._generate, version)
            self.launched = time.perf_counter()
        return head.batch, {
            "staleness": float(version - head.version),
            "dropped_groups": float(dropped),
            "gen_wait_time": t_sync,
        }

    def finish(self) -> dict[str, float]:
        """Wait for the generation in flight (the trainer's idle time) and queue its batch; nothing
        to wait for after a ``take`` that launched none."""
        if self.flight is None:
            return {"idle_time": 0.0}
        t0 = time.perf_counter()
        done = self.flight.result()  # a server's failure surfaces here, in the training thread
        self.flight = None
        self.pending.append(done)
        return {
            "idle_time": time.perf_counter() - t0,  # the trainer waited for the generation
            "server_gen_time": done.gen_time,  # the generation's own time, overlapped with the update
            "gen_idle_time": max(
                0.0, t0 - self.launched - done.gen_time
            ),  # the servers waited for the update
        }

    def state_dict(self) -> list[dict[str, Any]]:
        """The pending batches (CPU tensors), oldest first; nothing may be in flight."""
        assert self.flight is None, "a checkpoint between take() and finish()"
        return [
            {"batch": _on_cpu(p.batch), "version": p.version, "gen_time": p.gen_time} for p in self.pending
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """The pending batches of ``state_dict``, moved back onto the policy's device (they were
        saved from the CPU; the update feeds them to the model as they are)."""
        device = self.source.sampler.policy.device
        self.pending = deque(Pending(_on(s["batch"], device), s["version"], s["gen_time"]) for s in state)

    def close(self) -> None:
        if self.flight is not None:
            self.flight.cancel()
            try:
                self.flight.result()
            except BaseException:  # noqa: BLE001 - closing after a failure: the first error is reported
                pass
            self.flight = None
        self.pool.shutdown(wait=True)


def _on(batch: StepBatch, device: Any) -> StepBatch:
    trained = batch.trained.to(device)
    seen = trained if batch.seen is batch.trained else batch.seen.to(device)
    return StepBatch(trained, seen, batch.rounds)


def _on_cpu(batch: StepBatch) -> StepBatch:
    return _on(batch, "cpu")
