"""Base-model identity: an adapter fits a base model when the base's config and weights are the same,
wherever the base lives (another ``$GRPO_HOME``, a copy on another disk, a hub id or its local snapshot).

    fingerprint("/models/Qwen2.5-0.5B-Instruct") == fingerprint("Qwen/Qwen2.5-0.5B-Instruct")  # when cached

A fingerprint is a SHA-256 over
- ``config.json`` without the keys that say where or by which version it was saved (``_name_or_path``, ...);
- for each weight file (``*.safetensors``, else ``*.bin``), in name order: its name; for safetensors its
  header (tensor names, dtypes, shapes, offsets; metadata dropped), else its size; and ``SAMPLE_BLOCKS``
  blocks of ``SAMPLE_BYTES`` bytes spread evenly over the weight data.
It reads kilobytes, not the weights: two bases that differ only in bytes between the samples (a single
weight edited by hand) look the same. Fine-tuning or re-initialising changes every tensor, so any
trained or differently seeded model is told apart.

``grpo train`` records the fingerprint of an adapter's base in ``checkpoint-<step>/base_model.json``
(``record_base``), so the check works after the original base directory is gone;
``require_same_base`` is the comparison ``models.check_adapter_base`` (the one check every loader
runs before any weights load) makes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from grpo_cli.config import ConfigError

RECORD_FILE = "base_model.json"
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 4096
# config.json keys that name the origin (path, commit, library version), not the model.
_ORIGIN_KEYS = {"_name_or_path", "name_or_path", "_commit_hash", "transformers_version"}


def local_dir(name_or_path: str) -> Path | None:
    """The directory holding ``name_or_path``: itself when it is one, else a hub id's cached snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under that name
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _safetensors_header(fh: Any) -> tuple[bytes, int]:
    """(canonical header JSON without ``__metadata__``, byte offset where the weight data starts)."""
    (size,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return json.dumps(header, sort_keys=True).encode(), 8 + size


def _hash_weight_file(digest: Any, path: Path) -> None:
    total = path.stat().st_size
    with open(path, "rb") as fh:
        if path.suffix == ".safetensors":
            header, start = _safetensors_header(fh)
        else:
            header, start = str(total).encode(), 0
        digest.update(path.name.encode() + b"\0" + header)
        span = max(total - start - SAMPLE_BYTES, 0)
        for i in range(SAMPLE_BLOCKS):
            fh.seek(start + span * i // max(SAMPLE_BLOCKS - 1, 1))
            digest.update(fh.read(SAMPLE_BYTES))


def fingerprint(name_or_path: str) -> str | None:
    """SHA-256 hex of the model's config and a sample of its weights; None when not found locally."""
    directory = local_dir(name_or_path)
    if directory is None or not (directory / "config.json").is_file():
        return None
    config = json.loads((directory / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in _ORIGIN_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not weights:
        return None
    for path in weights:
        _hash_weight_file(digest, path)
    return digest.hexdigest()


def record_base(checkpoint_dir: str | Path, model: Any) -> None:
    """Write ``base_model.json`` (base path and fingerprint) beside an adapter; nothing for a full model."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return
    base = next(iter(peft_config.values())).base_model_name_or_path
    record = {"name_or_path": base, "fingerprint": fingerprint(base)}
    (Path(checkpoint_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def adapter_base_fingerprint(checkpoint: str, adapter_base: str) -> str | None:
    """The fingerprint recorded in the checkpoint, else that of its base when that is found here."""
    record = Path(checkpoint) / RECORD_FILE
    if record.is_file():
        recorded = json.loads(record.read_text()).get("fingerprint")
        if recorded:
            return recorded
    return fingerprint(adapter_base)


def require_same_base(checkpoint: str, adapter_base: str, base: str) -> None:
    """ConfigError (one line naming both) unless the adapter in ``checkpoint``, trained on
    ``adapter_base``, fits the model ``base``: the same path, or the same config and weights."""
    if adapter_base == base or Path(adapter_base).expanduser().resolve() == Path(base).expanduser().resolve():
        return
    theirs, ours = adapter_base_fingerprint(checkpoint, adapter_base), fingerprint(base)
    if theirs is not None and theirs == ours:
        return

    def short(fp: str | None) -> str:
        return fp[:12] if fp else "unknown: not found here"

    raise ConfigError(
        f"checkpoint={checkpoint}: adapter was trained on {adapter_base} (fingerprint {short(theirs)}), "
        f"not model.name_or_path={base} (fingerprint {short(ours)}): their config or weights differ"
    )


ADAPTER_CONFIG, MODEL_CONFIG = "adapter_config.json", "config.json"


def checkpoint_kind(name: str | Path) -> str:
    """What a checkpoint directory holds: "adapter" (LoRA: adapter_config.json) or "model" (config.json).

    The one probe of a model directory's kind; ConfigError (naming ``checkpoint=``) for anything else.
    """
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"checkpoint={name}: no such directory")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / MODEL_CONFIG).is_file():
        return "model"
    raise ConfigError(f"checkpoint={name}: holds neither adapter_config.json (LoRA) nor config.json (model)")


def checkpoint_base(checkpoint: str) -> str | None:
    """The base model an adapter checkpoint was trained from, or None for a full-model checkpoint."""
    if checkpoint_kind(checkpoint) == "model":
        return None
    return json.loads((Path(checkpoint).expanduser() / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
