"""The torch.distributed group that carries weights from the trainer to the servers' workers.

A stateless group (``TCPStore`` + one ``ProcessGroupGloo`` backend, made the way vLLM's own
``stateless_init_torch_distributed_process_group`` makes its gloo groups): it does not touch the
default process group, so the trainer can be a torchrun rank and each vLLM worker keeps its own
tensor-parallel group. Rank 0 is the trainer (it hosts the store); the servers' workers take ranks
1..N in the order of ``rollout.servers``, each server its tensor-parallel size of them. Gloo runs on
CPU everywhere; on GPUs the same group works with the tensors staged through host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

PREFIX = "grpo-cli-weights"


@dataclass
class WeightGroup:
    backend: Any  # ProcessGroupGloo
    store: Any  # the TCPStore: rank 0's must outlive the group (it serves the others)
    rank: int
    size: int


def join(host: str, port: int, rank: int, size: int, timeout_s: float) -> WeightGroup:
    """This process's member of the group; blocks until all ``size`` members joined (or ``timeout_s``)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    backend = dist.ProcessGroupGloo(dist.PrefixStore(PREFIX, store), rank, size, timeout)
    return WeightGroup(backend, store, rank, size)


def broadcast(group: WeightGroup, tensor: torch.Tensor) -> None:
    """``tensor`` from rank 0 to every member, in place (the members pass a buffer of its shape)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.backend.broadcast([tensor], opts).wait()


def checksum(tensors: list[torch.Tensor]) -> float:
    """A float64 fingerprint of what was sent (sum of |x| plus an index-weighted sum, per tensor):
    the trainer and each worker compute it on their own copies, so a sync that moved nothing (or
    moved the wrong bytes) shows as a mismatch."""
    total = 0.0
    for i, t in enumerate(tensors):
        x = t.detach().to(torch.float64).flatten()
        total += float(x.abs().sum()) + (i + 1) * float(x[:: max(1, x.numel() // 64)].sum())
    return total
