"""Data-parallel training on torch.distributed, launched by ``torchrun``; world size 1 without it.

    torchrun --nproc_per_node 8 -m grpo_cli train model=qwen train.prompts_per_step=64
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 \\
        -m grpo_cli train ...

Each of the W ranks takes ``prompts_per_step / W`` whole groups of a step, samples and scores them,
and computes its part of the loss; groups never straddle ranks, so group advantages stay local.
What the loss divides by (``core.loss.aggregation_units``) is summed over all ranks first, so every
rank's loss is its share of the one global loss, and the summed gradient is exactly the 1-process
gradient. Two ways to make that sum (``train.strategy``):

- ``ddp``: every rank holds the whole model (LoRA, or models that fit one device);
  ``DistributedDataParallel`` all-reduces the gradients once per optimizer step;
- ``fsdp``: full fine-tuning with parameters, gradients and optimizer state sharded over the ranks
  (FSDP2's ``fully_shard``, each decoder layer one unit); checkpoints gather the full weights on rank 0.

Both wrappers average gradients over the ranks, so the loss is multiplied by W before ``backward``.
Every model pass, sampling included, goes through one wrapper module (``Wrapper``), so DDP's and
FSDP's hooks see it however our code reaches into the model. Under FSDP every forward is a
collective: decoding keeps all ranks in step until the last rank's last sequence has ended.

Rank 0 alone writes checkpoints, metrics and the console; every rank reads a checkpoint to resume.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("grpo_cli")

# A collective that waits longer than this fails the job instead of hanging it (a rank stuck in a
# reward or dead without its peers noticing). Generous: a rank may evaluate or save meanwhile.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("GRPO_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in [0, size), local_rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def init() -> World:
    """Join the job torchrun started (nccl on CUDA, gloo on CPU); a plain process is world size 1.

    Idempotent: the CLI calls it before Hydra starts (ranks must agree on the run directory), the
    training loop again.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return World(rank, size, local)


def world() -> World:
    """The current job's ranks (world size 1 unless ``init`` joined a torchrun job)."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (every rank; after an error, without waiting for the others)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launcher() -> list[str]:
    """The command that starts ``grpo`` the way this job was started (for the printed resume command).

    Under torchrun: ``torchrun --nnodes N --nproc_per_node L -m grpo_cli``; on several nodes it is to
    be run on each, with the job's rendezvous flags added.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ["grpo"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return ["torchrun", f"--nnodes={max(size // local, 1)}", f"--nproc_per_node={local}", "-m", "grpo_cli"]


def shard(items: Sequence[Any], w: World | None = None) -> list[Any]:
    """This rank's contiguous share of ``items`` (len(items) must divide by the world size)."""
    w = w or world()
    if len(items) % w.size:
        raise ValueError(f"{len(items)} items do not split evenly over {w.size} ranks")
    n = len(items) // w.size
    return list(items[w.rank * n : (w.rank + 1) * n])


def _device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo takes CPU ones.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(x: float | torch.Tensor, op: Any) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().to(_device()).clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def all_sum(x: float | torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a float64 copy on the reduction's device; the value itself with one rank)."""
    return _reduce(x, dist.ReduceOp.SUM)


def all_max(x: float | torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, like ``all_sum``."""
    return _reduce(x, dist.ReduceOp.MAX)


def all_min(x: float | torch.Tensor) -> torch.Tensor:
    """Minimum over ranks, like ``all_sum``."""
    return _reduce(x, dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(all_max(float(flag)) > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on all of them."""
    return not any_rank(not flag)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------- wrapping the model


class Wrapper(nn.Module):
    """The root module DDP / FSDP wrap: ``wrapper(fn, *args)`` runs ``fn(model, *args)``.

    Our passes reach into the model (``get_decoder()``, the key/value cache, the output embedding):
    routing them through this one ``forward`` lets the wrapper's hooks (DDP's gradient bookkeeping,
    FSDP's parameter gathering) run around each of them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)


def wrap(model: nn.Module, strategy: str, trainable: bool = True) -> nn.Module:
    """``model`` inside a Wrapper wrapped by DDP or FSDP2 for the current process group.

    ``trainable=False`` (the frozen reference policy under FSDP): sharded, never updated.
    """
    wrapper = Wrapper(model)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(_device().type, (dist.get_world_size(),))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(wrapper, mesh=mesh)  # embeddings, final norm, output head: gathered once per pass
        return wrapper
    if not trainable:
        return wrapper
    ids = [torch.cuda.current_device()] if _device().type == "cuda" else None
    # No buffer sync before each forward: the only buffers are rotary tables, equal on every rank.
    # (torch >= 2.13 names the switch forward_sync_buffers; broadcast_buffers before.)
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(wrapper, device_ids=ids, **no_sync)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"train.strategy=fsdp: {type(model).__name__} has no decoder.layers to shard")
    return list(layers)


def is_fsdp(wrapper: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapper, FSDPModule)


@contextlib.contextmanager
def grad_sync(wrapper: Any, enabled: bool) -> Iterator[None]:
    """Within this block, ``backward`` only accumulates locally unless ``enabled`` (the last micro-batch)."""
    if wrapper is None or enabled:
        yield
    elif isinstance(wrapper, nn.parallel.DistributedDataParallel):
        with wrapper.no_sync():
            yield
    elif is_fsdp(wrapper):
        wrapper.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapper.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip by the global gradient norm (sharded gradients included); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
    return float(full() if full else norm)


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of ``params`` (local shards included) is finite on every rank."""
    ok = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in params)
    return all_ranks(ok)


def full_state(wrapper: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """Under FSDP, the full model and optimizer state dicts on CPU (a collective: every rank calls it).

    Returns (None, None) for an unsharded model: its own state dicts are already whole.
    """
    if wrapper is None or not is_fsdp(wrapper):
        return None, None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(wrapper, options=opts)
    optim_sd = get_optimizer_state_dict(wrapper, optimizer, options=opts)
    prefix = "module."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in model_sd.items()}, optim_sd


def load_optimizer_state(wrapper: Any, optimizer: Any, state: dict) -> None:
    """Load an optimizer state dict saved by ``full_state`` (FSDP) or by ``optimizer.state_dict()``."""
    if wrapper is None or not is_fsdp(wrapper):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        wrapper, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
