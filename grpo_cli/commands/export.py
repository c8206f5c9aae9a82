"""``grpo export``: a checkpoint as a plain transformers model directory, for any tool that loads one.

    grpo export checkpoint=outputs/<date>/<time>/checkpoint-200 out=exported/model
    grpo export checkpoint=outputs/<run>/checkpoint-200 out=exported/model dtype=bfloat16
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported/model')"

A LoRA checkpoint is merged into its base (peft's ``merge_and_unload``: W + (alpha / r) B A per
adapted layer), so the result needs no peft; a full fine-tuned checkpoint is written as it is. The
checkpoint is loaded the way ``grpo train`` and ``grpo eval`` load it (``models.load_policy``): the
same manifest check first (a damaged checkpoint is the one-line error ``grpo eval`` gives, exit 2),
the same base-model check of an adapter. An adapter's base is the checkpoint's run's
``model.name_or_path`` (its saved ``config.yaml``) unless the command line names one.

The merge runs in float32 whatever ``model.dtype`` says (a bf16 merge would round the small LoRA
update into the base weights' last bits); the weights are cast to ``dtype`` only when written.
``dtype=auto`` keeps the base model's own (its ``config.json``; float32 when it names none).

``out`` receives ``config.json``, the weights (safetensors), ``generation_config.json`` and the
tokenizer's files with its chat template, as the checkpoint (or, where it saved none, its base) has
them. It must not exist or be empty: nothing is overwritten. The files are written to
``<out>.partial`` and renamed, so an export that fails half-way leaves no ``out`` behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from grpo_cli.commands.validate import validate_export
from grpo_cli.config import ExportRoot, get_key, hydra_overrides, override_key
from grpo_cli.models import DTYPES, load_policy, resolve_path, tokenizer_source
from grpo_cli.models.identity import MODEL_CONFIG, checkpoint_kind, local_dir
from grpo_cli.run.saved import saved_config, whole_checkpoints
from grpo_cli.runtime.logs import setup_logging

log = logging.getLogger("grpo_cli")


def base_model(cfg: ExportRoot, overrides: list[str]) -> str:
    """The model an adapter was trained on: model.name_or_path from the command line, else the run's."""
    if "model.name_or_path" not in {override_key(o) for o in overrides}:
        saved = saved_config(cfg.checkpoint)
        try:
            return get_key(saved, "model.name_or_path") if saved else cfg.model.name_or_path
        except (KeyError, AttributeError):
            pass
    return cfg.model.name_or_path


def weights_dtype(name: str, model_dir: str) -> torch.dtype:
    """``dtype`` as a torch dtype; ``auto``: the one ``model_dir``'s config.json names (float32 if none
    or not found)."""
    if name != "auto":
        return DTYPES[name]
    directory = local_dir(model_dir)  # a hub id: its cached snapshot
    if directory is None or not (directory / MODEL_CONFIG).is_file():
        return torch.float32
    config = json.loads((directory / MODEL_CONFIG).read_text())
    saved = config.get("dtype") or config.get("torch_dtype")  # transformers 5 / 4 spell it differently
    return DTYPES.get(saved, torch.float32)


def merged_model(cfg: ExportRoot) -> tuple[Any, str]:
    """The checkpoint as one transformers model in float32 on CPU (LoRA merged), and the directory
    whose config.json holds the base's dtype (the checkpoint itself for a full model)."""
    model_cfg = replace(cfg.model, dtype="float32", device="cpu", gradient_checkpointing=False)
    policy = load_policy(model_cfg, cfg.lora, beta=0.0, checkpoint=cfg.checkpoint, trainable=False)
    if not policy.is_lora:
        return policy.model, cfg.checkpoint
    return policy.model.merge_and_unload(), resolve_path(cfg.model.name_or_path)


def write_export(cfg: ExportRoot, model: Any, dtype: torch.dtype) -> Path:
    """Model, generation config and tokenizer (unchanged: read again from its files) into ``cfg.out``."""
    from transformers import AutoTokenizer

    out = Path(cfg.out).expanduser()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a failed export's leftovers: ours, never the user's
    model.to(dtype).save_pretrained(partial)  # also generation_config.json, when the model has one
    source = tokenizer_source(cfg.checkpoint, resolve_path(cfg.model.name_or_path))
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)  # chat template included
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out)  # onto an empty directory or none: validate_export refused anything else
    return out


def run(cfg: ExportRoot, run_dir: str, overrides: list[str] | None = None) -> Path:
    """Export ``cfg.checkpoint`` to ``cfg.out``; returns ``out``. ``run_dir`` is Hydra's (unused)."""
    setup_logging()
    validate_export(cfg)
    whole_checkpoints([cfg.checkpoint])  # before anything of it is read: one line when damaged
    kind = checkpoint_kind(cfg.checkpoint)
    if kind == "adapter":
        cfg.model.name_or_path = base_model(cfg, hydra_overrides() if overrides is None else overrides)
    model, dtype_source = merged_model(cfg)
    dtype = weights_dtype(cfg.dtype, dtype_source)
    out = write_export(cfg, model, dtype)
    what = f"LoRA merged into {cfg.model.name_or_path}" if kind == "adapter" else "full model"
    n = sum(p.numel() for p in model.parameters())
    print(
        f"exported {cfg.checkpoint} ({what}) to {out}: {n:,} parameters in {str(dtype).removeprefix('torch.')}"
    )
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) (no peft needed)")
    return out
