"""The process's global random state: seeding it, saving it into a checkpoint, restoring it, forking it
around work that must not consume it (building the tiny model, starting vLLM)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A seed in [0, 2**63) that is a function of ``keys`` alone (numpy's SeedSequence hashes them).

    The one seed derivation of the project: a prompt's stream from the run's seed, its stream and its
    draw (``rollout.batch.draw_seed``), a turn's from its group's seed, the episode and the turn
    (``envs.episode``). Streams built this way do not depend on batching, the rank or the world size.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNGs: python, numpy, torch CPU, and CUDA once it is in use (reading it would start it)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def forked_rng() -> Iterator[None]:
    """The global RNGs as they were before the block, after it (building the tiny model, vLLM's start)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
