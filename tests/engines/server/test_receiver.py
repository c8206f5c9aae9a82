"""The weight receiver's check of what the served model took, with a stand-in for vLLM's worker
(no server needed): a loader that skips a tensor fails the sync; only the sending rank copies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo_cli.engines import server as server_mod
from grpo_cli.engines.server import SyncFailed, check_loaded
from grpo_cli.engines.server import group as weight_group
from grpo_cli.engines.server.receiver import load_checked

URL = "http://10.0.0.2:8000"


class FakeModel(torch.nn.Module):
    """vLLM-style: ``load_weights`` writes what it maps and returns the parameter names it wrote."""

    def __init__(self, skip: set[str] = frozenset(), stop_after: int | None = None):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
        self.skip, self.stop_after = skip, stop_after

    def load_weights(self, weights):
        wrote = set()
        for i, (name, t) in enumerate(weights):
            if self.stop_after is not None and i >= self.stop_after:
                break
            if name in self.skip:
                continue  # a name the loader does not map
            getattr(self, name).data.copy_(t)
            wrote.add(name)
        return wrote


class FakeWorker:
    def __init__(self, model: FakeModel):
        self.model_runner = SimpleNamespace(get_model=lambda: model)

    def reload_weights(self, weights_iterator):
        self.model_runner.get_model().load_weights(weights_iterator)


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randn(2, 3, generator=g)), ("b", torch.randn(4, generator=g))]


def _answer(model: FakeModel) -> dict:
    return load_checked(FakeWorker(model), _weights())


def test_a_loader_that_writes_every_tensor_passes_and_the_model_holds_them():
    model = FakeModel()
    w = _weights()
    answer = _answer(model)
    check_loaded(URL, [answer], len(w), weight_group.checksum([t for _, t in w]), 1)
    assert torch.equal(model.a, w[0][1]) and torch.equal(model.b, w[1][1])
    assert "load_weights" not in vars(model)  # the recording wrapper is gone after the load


def test_a_loader_that_skips_a_tensor_fails_the_sync_naming_the_parameter():
    w = _weights()
    answer = _answer(FakeModel(skip={"b"}))
    assert answer["missing"] == ["b"]
    with pytest.raises(SyncFailed, match=r"10\.0\.0\.2:8000: .* left 1 parameter\(s\) .* unwritten \(b\)"):
        check_loaded(URL, [answer], len(w), weight_group.checksum([t for _, t in w]), 3)


def test_a_loader_that_stops_early_fails_the_sync_on_the_count():
    w = _weights()
    answer = _answer(FakeModel(stop_after=1))
    assert answer["tensors"] in (1, 2)  # the generator may have handed out the next one
    with pytest.raises(SyncFailed):
        check_loaded(URL, [answer], len(w), weight_group.checksum([t for _, t in w]), 3)


def test_other_bytes_than_were_sent_fail_the_sync():
    w = _weights()
    answer = _answer(FakeModel())
    with pytest.raises(SyncFailed, match="loaded other bytes than were sent"):
        check_loaded(URL, [answer], len(w), weight_group.checksum([t for _, t in w]) + 1.0, 3)
    with pytest.raises(SyncFailed, match="answered nothing"):
        check_loaded(URL, [{}], len(w), 0.0, 3)


class Recorded:
    """A weight that records whether it was copied to host memory."""

    copies = 0

    def contiguous(self):
        return self

    def cpu(self):
        Recorded.copies += 1
        return torch.zeros(1)


@pytest.mark.parametrize("main", [True, False])
def test_only_the_sending_rank_copies_the_weights_to_host_memory(monkeypatch, main):
    pushed = []
    monkeypatch.setattr(
        server_mod, "policy_weights", lambda model: iter([("a", Recorded()), ("b", Recorded())])
    )
    monkeypatch.setattr(server_mod.distributed, "world", lambda: SimpleNamespace(is_main=main))
    monkeypatch.setattr(server_mod.distributed, "barrier", lambda: None)
    engine = object.__new__(server_mod.ServerEngine)
    engine.policy = SimpleNamespace(model=None)
    engine._push = pushed.append
    Recorded.copies = 0
    engine.sync()
    assert Recorded.copies == (2 if main else 0)
    assert len(pushed) == (1 if main else 0)
