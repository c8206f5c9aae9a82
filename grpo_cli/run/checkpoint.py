"""Checkpoints: everything needed to continue a run exactly, written atomically; stopping on a signal.

``<run_dir>/checkpoint-<step>/`` holds
- the weights as plain transformers / peft save them (an adapter, or the full model) and the tokenizer,
  so ``from_pretrained`` loads a checkpoint without this package;
- ``trainer_state.pt``: step, optimizer and scheduler state, RNG states (python, numpy, torch CPU and
  every CUDA device), the prompt sampler's position, the bad-step counters and the held-out metrics so far;
- ``config.yaml``: the resolved run config;
- for an adapter, ``base_model.json``: its base's path and fingerprint (``models.identity``), so it
  loads on the same base under another path.

- ``manifest.json``, written last: every file's size and SHA-256 (``run.manifest``). Only a checkpoint
  whose files match it is *whole*; ``resolve_resume`` passes over the others, naming the bad file.

A checkpoint is written into a hidden temporary directory and renamed into place, so a process killed
mid-save leaves the previous checkpoints intact and never a half-written ``checkpoint-<step>``
(``remove_partial`` clears the leftover temporary directory when the run starts again). A rename is
atomic against a killed process; against a power cut the files would also need an fsync, which we skip.
A save that fails (no space left, no permission) raises ``SaveFailed`` and leaves the same: nothing.

``GracefulStop`` turns the first Ctrl-C / SIGTERM into "finish this step, save, print the resume
command" (``resume_command``) and a second one into an immediate stop.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from grpo_cli.config import RENAMED, ConfigError, hydra_overrides, leaves, override_key
from grpo_cli.models import identity
from grpo_cli.run import manifest
from grpo_cli.runtime import rng

log = logging.getLogger("grpo_cli")

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
# Exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Exit status of a run stopped because a checkpoint could not be written: EX_IOERR of sysexits.h.
SAVE_FAILED_EXIT = 74


class SaveFailed(OSError):
    """A checkpoint could not be written (the message is one line); nothing of it is left behind."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory in ``run_dir``, whole or not, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints in ``run_dir`` that hold their trainer state, oldest first (not verified: ``resolve_resume``)."""
    return [p for p in checkpoint_dirs(run_dir) if (p / STATE_FILE).is_file()]


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete temporary directories left by a save that was killed; returns what was removed."""
    run = Path(run_dir)
    stale = [p for p in run.glob(f"{_TMP_PREFIX}*") if p.is_dir()] if run.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@dataclass
class Saved:
    """What a checkpoint holds besides its step: the trained model (an adapter or the whole model) and
    its tokenizer, the trainer's state (``run.resume.trainer_state``) and the run's resolved config;
    ``model_state``: the full weights when ``model`` holds only a shard of them (FSDP)."""

    model: Any
    tokenizer: Any
    trainer_state: dict[str, Any]
    config_yaml: str
    model_state: dict[str, torch.Tensor] | None = None


def save(run_dir: str | Path, step: int, saved: Saved, keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the newest ``keep`` checkpoints (0: all).

    The files are written into a temporary directory, the manifest last, then renamed into place; a
    failure names the part being written. The RNG states are taken here, so the caller must save at
    the point of the step sequence where a resumed run will continue (after everything of ``step``
    that draws random numbers).
    """
    run = Path(run_dir)
    final = run / f"checkpoint-{step}"
    stage, tmp = "its temporary directory", None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=run))
        with manifest.Hasher() as hasher:
            stage = "the weights"
            state_dict = {} if saved.model_state is None else {"state_dict": saved.model_state}
            saved.model.save_pretrained(tmp, **state_dict)
            identity.record_base(
                tmp, saved.model
            )  # an adapter's base by config and weights, not only its path
            stage = "the tokenizer"
            saved.tokenizer.save_pretrained(tmp)
            hashed: dict[str, Any] = hasher.all_files(tmp)  # hashed while the trainer state is written
            stage = STATE_FILE
            state = {**saved.trainer_state, "step": step, "rng": rng.rng_state()}
            hashed[STATE_FILE] = manifest.write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
            stage = "config.yaml"
            text = (manifest.MARK + saved.config_yaml).encode()
            hashed["config.yaml"] = manifest.write_file(tmp / "config.yaml", lambda f: f.write(text))
            stage = manifest.MANIFEST
            manifest.write(tmp, step, hashed)  # last: the checkpoint is whole from here on
        stage = "the rename into place"
        publish(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as exc:
        cause = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise SaveFailed(
            f"step {step}: {final.name} could not be saved ({stage}: {cause}); the checkpoints "
            "saved before it are untouched"
        ) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _WHOLE[_stamp(final)] = True  # hashed as it was written
    prune(run, keep, final)
    return final


# Checkpoints this process knows are whole or not: written by it, or hashed once, keyed by every
# file's size and modification time (hashing a large model's files at every save would cost as much
# as writing them; a file changed since changes its stamp and is hashed again).
_WHOLE: dict[tuple, bool] = {}


def _stamp(path: Path) -> tuple:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _whole(path: Path) -> bool:
    key = _stamp(path)
    if key not in _WHOLE:
        _WHOLE[key] = manifest.verify(path, need=(STATE_FILE,)).whole
    return _WHOLE[key]


def prune(run_dir: str | Path, keep: int, newest: Path) -> list[Path]:
    """``train.keep_checkpoints``: keep ``newest`` (the checkpoint just written) and the ``keep`` - 1
    highest-step other whole checkpoints, remove the other whole ones (0: keep all). A damaged
    checkpoint is not counted among those kept and not removed either (``resolve_resume`` names it;
    whoever looks at it decides). Returns what was removed."""
    if keep <= 0:
        return []
    others = [p for p in checkpoint_dirs(run_dir) if p.resolve() != newest.resolve()]
    whole = [p for p in others if _whole(p)]
    removed = whole[: max(0, len(whole) - (keep - 1))]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def publish(tmp: Path, final: Path) -> None:
    """Rename the written directory ``tmp`` into place as ``final`` (replacing an older one of that step)."""
    if final.exists():  # re-saving a step (a resumed run that went back): move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{final.name}-", dir=final.parent))
        os.replace(final, old / final.name)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``train.resume``: None, ``auto`` (the newest whole checkpoint in run_dir, if any) or a path.

    ``auto`` passes over a checkpoint that is not whole with one warning naming the file and why; a
    path that is not a whole checkpoint, or a run dir whose checkpoints all are damaged, is a
    ConfigError. Only the checkpoint taken (and any newer one passed over) is hashed.
    """
    if not resume:
        return None
    if resume != "auto":
        if not Path(resume).expanduser().is_dir():
            raise ConfigError(f"train.resume={resume}: not a complete checkpoint: no such directory")
        verdict = manifest.verify(resume, need=(STATE_FILE,))
        if not verdict.whole:
            raise ConfigError(f"train.resume={resume}: not a complete checkpoint: {verdict.damage}")
        _say_unverified(verdict)
        return Path(resume).expanduser()
    found = checkpoint_dirs(run_dir)
    for path in reversed(found):
        verdict = manifest.verify(path, need=(STATE_FILE,))
        if verdict.whole:
            _say_unverified(verdict)
            return path
        log.warning("train.resume=auto: passing over %s: %s", path.name, verdict.damage)
    if found:
        raise ConfigError(
            f"train.resume=auto: no whole checkpoint in {run_dir} (each is named above); move the "
            "damaged ones aside to start this run over"
        )
    return None


def _say_unverified(verdict: manifest.Verdict) -> None:
    if not verdict.verified:
        log.warning(verdict.unverified_line())


def config_changes(old_yaml: str, new_yaml: str, ignore: Sequence[str] = ()) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two resolved configs (keys in ``ignore`` skipped)."""
    from omegaconf import OmegaConf

    old = leaves(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = leaves(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    old = {RENAMED.get(k, k): v for k, v in old.items()}  # a checkpoint saved before a key was renamed
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]


def resume_command(
    run_dir: str | Path, overrides: Sequence[str] | None = None, launcher: Sequence[str] = ("grpo",)
) -> str:
    """The shell command that continues this run: the same overrides, this run dir, ``train.resume=auto``.

    ``overrides`` defaults to the ones Hydra parsed for this job (empty outside a Hydra run);
    ``launcher`` is what runs the subcommand (``distributed.launcher()`` under torchrun).
    """
    if overrides is None:
        overrides = hydra_overrides()
    drop = ("train.resume", "hydra.run.dir")
    kept = [o for o in overrides if override_key(o) not in drop]
    return shlex.join(
        [*launcher, "train", *kept, f"hydra.run.dir={Path(run_dir).resolve()}", "train.resume=auto"]
    )


class GracefulStop:
    """Within this block the first SIGINT / SIGTERM only sets ``signum``; a second raises KeyboardInterrupt.

    The training loop checks ``requested`` after each step, saves and exits with ``exit_code``
    (130 for SIGINT, 143 for SIGTERM). Handlers can only be installed on the main thread; elsewhere
    the block does nothing and signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.signum = signum
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write, not print or logging: a handler may run in the middle of either's own write.
        os.write(
            2,
            f"\n{name}: finishing this step, then saving a checkpoint "
            f"(press Ctrl-C again to stop at once, without saving)\n".encode(),
        )
