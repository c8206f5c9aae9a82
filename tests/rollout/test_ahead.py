"""The schedule of rollouts generated ahead (``rollout.max_staleness``), with a stand-in for the
generation: which weights sample each step's batch, drops, and the checkpoint round trip."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from grpo_cli.rollout import ahead as ahead_mod
from grpo_cli.rollout.ahead import RolloutsAhead
from grpo_cli.rollout.batch import StepBatch


class FakeGeneration:
    """roll_out_batch's stand-in: batch j holds j, and records the weight version live when it ran."""

    def __init__(self, weights: dict, delay: float = 0.0):
        self.weights, self.delay, self.count = weights, delay, 0
        self.started = threading.Event()  # set as a generation starts, with the thread it runs on
        self.thread: str | None = None

    def __call__(self, source):
        self.count += 1
        self.thread = threading.current_thread().name
        self.started.set()
        j, v = self.count, self.weights["version"]
        time.sleep(self.delay)
        return StepBatch(*[FakeRollout(torch.full((source.prompts_per_step * 2, 3), j), (j, v))] * 2, 1)


class FakeRollout:
    """A rollout that records where ``.to()`` moved it: the copy knows its device, the original is unchanged."""

    def __init__(self, completion_ids: torch.Tensor, tag: tuple, device: str = "cpu"):
        self.completion_ids, self.tag, self.device = completion_ids, tag, device

    def to(self, device) -> FakeRollout:
        return FakeRollout(self.completion_ids, self.tag, str(device))


def _source(device: str = "cpu") -> SimpleNamespace:
    """What RolloutsAhead reads of its BatchSource: G = 2, 2 prompts a step, the policy's device."""
    policy = SimpleNamespace(device=torch.device(device))
    return SimpleNamespace(
        algo=SimpleNamespace(group_size=2), prompts_per_step=2, sampler=SimpleNamespace(policy=policy)
    )


def _run(monkeypatch, staleness: int, steps: int, delay: float = 0.0, start=None):
    weights = {"version": 0}
    gen = FakeGeneration(weights, delay)
    monkeypatch.setattr(ahead_mod, "roll_out_batch", gen)
    a = RolloutsAhead(_source(), staleness)
    if start is not None:
        a.load_state_dict(start["pending"])
        gen.count = start["count"]
        weights["version"] = start["version"]
    rows = []
    for step in range(weights["version"] + 1, weights["version"] + steps + 1):
        batch, m = a.take(version=step - 1)
        time.sleep(delay)  # the update
        m.update(a.finish())
        weights["version"] = step  # the sync: the servers serve the updated weights
        rows.append((step, batch.trained.tag, m))
    state = {"pending": a.state_dict(), "count": gen.count, "version": weights["version"]}
    a.close()
    return rows, state


@pytest.mark.parametrize("staleness", [1, 2, 3])
def test_each_step_trains_on_the_batch_sampled_exactly_s_versions_before(monkeypatch, staleness):
    """Step k trains on batch k, sampled by version max(0, k - 1 - S): the lag is min(k - 1, S), never more."""
    rows, _ = _run(monkeypatch, staleness, steps=8, delay=0.01)
    for step, (j, v), m in rows:
        assert j == step
        assert v == max(0, step - 1 - staleness)
        assert m["staleness"] == min(step - 1, staleness) == step - 1 - v
        assert m["dropped_groups"] == 0


def test_generation_overlaps_the_update(monkeypatch):
    """The next batch is sampled while the step trains: after take() its generation starts on the
    background thread without waiting for finish(), and finish() hands that very batch on."""
    gen = FakeGeneration({"version": 0})
    monkeypatch.setattr(ahead_mod, "roll_out_batch", gen)
    a = RolloutsAhead(_source(), 1)
    try:
        a.take(0)  # fills the one pending batch in this thread, then launches the next
        a.finish()
        for step in range(2, 5):
            gen.started.clear()
            a.take(step - 1)
            # "The update": nothing calls finish() until the generation has started by itself (a
            # schedule that generated only inside finish() would never set the event).
            assert gen.started.wait(timeout=60), "the next batch's generation did not start during the update"
            assert gen.thread.startswith("grpo-ahead")
            before = gen.count
            a.finish()
            assert gen.count == before  # finish() waited for it; it generated nothing more
            assert a.pending[-1].batch.trained.tag[0] == before  # and queued exactly that batch
    finally:
        a.close()


def test_checkpointed_pending_batches_resume_the_schedule_exactly(monkeypatch):
    """Stopping after step 4 and going on from the saved pending batches trains on what the
    uninterrupted run trained on, with the same lags."""
    straight, _ = _run(monkeypatch, 2, steps=8)
    first, state = _run(monkeypatch, 2, steps=4)
    assert [p["version"] for p in state["pending"]] == [2, 3]
    rest, _ = _run(monkeypatch, 2, steps=4, start=state)
    assert [(s, tag, m["staleness"]) for s, tag, m in first + rest] == [
        (s, tag, m["staleness"]) for s, tag, m in straight
    ]


def test_batches_older_than_the_bound_are_dropped_and_counted(monkeypatch):
    """Resumed with a smaller max_staleness, the pending batch that would lag more is dropped (its
    groups counted) and a fresh one sampled in its place."""
    _, state = _run(monkeypatch, 2, steps=4)  # pending: versions 2 and 3, at version 4
    rows, _ = _run(monkeypatch, 1, steps=1, start=state)
    step, (j, v), m = rows[0]
    assert m["dropped_groups"] == 2  # one batch of 2 prompts
    assert step - 1 - v <= 1


def test_restored_pending_batches_land_on_the_policys_device(monkeypatch):
    """The checkpoint holds the pending batches on the CPU; restored, each is moved to the policy's
    device (here a CUDA device the fake rollout only records), its trained and seen views alike."""
    _, state = _run(monkeypatch, 2, steps=3)
    assert {p["batch"].trained.device for p in state["pending"]} == {"cpu"}
    a = RolloutsAhead(_source("cuda:1"), 2)
    a.load_state_dict(state["pending"])
    assert [p.batch.trained.device for p in a.pending] == ["cuda:1", "cuda:1"]
    assert all(p.batch.seen is p.batch.trained for p in a.pending)
    batch, _ = a.take(version=3, launch=False)
    assert batch.trained.device == "cuda:1" and batch.trained.tag == state["pending"][0]["batch"].trained.tag
    a.close()


def test_the_last_step_generates_nothing_ahead_and_waits_for_nothing(monkeypatch):
    """take(launch=False) trains on the oldest pending batch and starts no generation; finish() then
    returns at once with no server time, and the pending batches left are the S - 1 not consumed."""
    weights = {"version": 0}
    gen = FakeGeneration(weights, delay=0.0)
    monkeypatch.setattr(ahead_mod, "roll_out_batch", gen)
    a = RolloutsAhead(_source(), 2)
    a.take(0)
    a.finish()
    assert gen.count == 3  # two filled at start, one launched
    _, _ = a.take(1, launch=False)
    assert a.flight is None
    m = a.finish()
    assert gen.count == 3
    assert m == {"idle_time": 0.0}
    assert len(a.pending) == 1
    a.close()
