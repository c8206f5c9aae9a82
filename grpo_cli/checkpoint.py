"""Checkpoints: everything needed to continue a run exactly, written atomically.

``<run_dir>/checkpoint-<step>/`` holds
- the weights as plain transformers / peft save them (an adapter, or the full model) and the tokenizer,
  so ``from_pretrained`` loads a checkpoint without this package;
- ``trainer_state.pt``: step, optimizer and scheduler state, RNG states (python, numpy, torch CPU and
  every CUDA device) and the prompt sampler's position;
- ``config.yaml``: the resolved run config.

A checkpoint is written into a hidden temporary directory and renamed into place, so a process killed
mid-save leaves the previous checkpoints intact and never a half-written ``checkpoint-<step>``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Test hook: seconds to sleep between writing the files and renaming the directory into place.
_SAVE_DELAY_ENV = "GRPO_TEST_SAVE_DELAY"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save(run_dir: str | Path, step: int, model: Any, tokenizer: Any, trainer_state: dict[str, Any],
         config_yaml: str, keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the newest ``keep`` checkpoints."""
    run = Path(run_dir)
    final = run / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=run))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
        delay = float(os.environ.get(_SAVE_DELAY_ENV, "0") or 0)
        if delay:
            import time

            time.sleep(delay)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``train.resume``: None, ``auto`` (newest complete checkpoint in run_dir, if any) or a path."""
    from grpo_cli.config import ConfigError

    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path
