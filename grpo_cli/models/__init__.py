"""Load the policy, its tokenizer and the reference policy (per-token log-probs: ``models.logprobs``).

One loading path for every model: the embedded tiny model is a directory like any other, so
``model=tiny`` and ``model=qwen`` go through the same ``from_pretrained`` calls.

The reference policy pi_ref:
- with LoRA it is the base model with the adapter switched off (``peft``'s ``disable_adapter``),
  so no second copy of the weights is held;
- with full fine-tuning it is a frozen copy, made only when ``algo.beta > 0``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo_cli.config import ConfigError
from grpo_cli.models.identity import checkpoint_base, require_same_base
from grpo_cli.models.tiny import TinySpec, ensure_tiny
from grpo_cli.models.tiny_rg import ensure_tiny_rg
from grpo_cli.runtime.distributed import is_fsdp

log = logging.getLogger("grpo_cli")


@dataclass
class Policy:
    model: Any  # a transformers CausalLM, or a peft PeftModel around one
    tokenizer: Any
    device: torch.device
    ref_model: Any | None = None  # frozen copy (full fine-tuning with beta > 0)
    # Token ids that end a completion: the tokenizer's EOS plus the model's generation_config ones
    # (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>). Empty: the tokenizer's eos_token_id alone.
    eos_ids: tuple[int, ...] = ()
    is_lora: bool = False
    # With several ranks: the DDP / FSDP wrappers (``distributed.wrap``) every pass goes through.
    wrapper: Any | None = None
    ref_wrapper: Any | None = None

    @property
    def lockstep(self) -> bool:
        """Every forward is a collective (FSDP): ranks must run the same number of passes."""
        return self.wrapper is not None and is_fsdp(self.wrapper)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` on the policy, through its distributed wrapper when it has one."""
        if self.wrapper is not None:
            return self.wrapper(fn, *args, **kwargs)
        return fn(self.model, *args, **kwargs)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """The model in eval mode (dropout off) inside the block, as it was after it."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


# model.dtype: these, or "auto".
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# model.name_or_path values that name a model built here on first use (resolve_path), not a path or hub id.
EMBEDDED = ("tiny", "tiny-tools", "tiny-rg")


def resolve_path(name_or_path: str) -> str:
    """The directory or hub id to load: ``tiny`` is built on first use and cached."""
    if name_or_path == "tiny":
        return str(ensure_tiny())
    if name_or_path == "tiny-tools":  # the tool variant (env=calc)
        return str(ensure_tiny(TinySpec(tools=True)))
    if name_or_path == "tiny-rg":  # warmed up on reasoning-gym's chain_sum (data=reasoning_gym)
        return str(ensure_tiny_rg())
    return name_or_path


def stop_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """The EOS set: the tokenizer's eos_token_id first, then generation_config.eos_token_id (int or list)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded so every completion starts at one column
    return tok


def tokenizer_source(checkpoint: str | None, base_path: str) -> str:
    """Where a checkpoint's tokenizer is read: the checkpoint when it saved one, else its base."""
    if checkpoint and (Path(checkpoint) / "tokenizer_config.json").exists():
        return checkpoint
    return base_path


def _load_causal_lm(path: str, model_cfg: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"model.name_or_path={path}: cannot be loaded ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device)


def load_policy(
    model_cfg: Any,
    lora_cfg: Any,
    beta: float,
    checkpoint: str | None = None,
    trainable: bool = True,
    stage_on_cpu: bool = False,
) -> Policy:
    """Policy (+ reference) for training, sampling or evaluation.

    ``checkpoint``: an adapter directory (its base must be the configured model) or a full model
    directory saved by ``grpo train``; None starts from ``model.name_or_path``. ``stage_on_cpu``: keep
    the weights in CPU memory although the run's device is a GPU (FSDP moves each layer's shard there
    as it wraps it, so a model larger than one GPU never lands on one whole).
    """
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    load_device = torch.device("cpu") if stage_on_cpu else device
    base_path = ref_path = resolve_path(model_cfg.name_or_path)
    adapter_base = check_adapter_base(checkpoint, model_cfg.name_or_path) if checkpoint else None
    if checkpoint and adapter_base is None:
        base_path = checkpoint  # a full-model checkpoint replaces the base weights
    tokenizer = load_tokenizer(tokenizer_source(checkpoint, base_path))
    model = _load_causal_lm(base_path, model_cfg, dtype, load_device)
    policy = Policy(model=model, tokenizer=tokenizer, device=device, eos_ids=stop_ids(tokenizer, model))
    if adapter_base is not None or (lora_cfg.enabled and trainable):
        policy.model = _wrap_lora(model, lora_cfg, checkpoint if adapter_base else None, trainable)
        policy.is_lora = True
    elif trainable and beta > 0:
        policy.ref_model = (
            _load_causal_lm(ref_path, model_cfg, dtype, load_device).eval().requires_grad_(False)
        )
    if model_cfg.gradient_checkpointing and trainable:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.model.config.use_cache = False
    return policy


def _wrap_lora(model: Any, lora_cfg: Any, adapter_dir: str | None, trainable: bool) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    # Adapters in float32 over bf16/fp16 base weights (peft's default, pinned here): their small
    # updates would round away in bf16, and they are a small share of the matmuls.
    if adapter_dir is not None:
        return PeftModel.from_pretrained(
            model, adapter_dir, is_trainable=trainable, autocast_adapter_dtype=True
        )
    targets = lora_cfg.target_modules
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)


@contextlib.contextmanager
def reference(policy: Policy) -> Iterator[Callable[..., Any]]:
    """pi_ref inside this block, as a runner like ``Policy.run`` (the adapter is off while it is open)."""
    if policy.is_lora:
        with _adapters_off(policy.model):
            yield policy.run
    elif policy.ref_model is not None:
        if policy.ref_wrapper is not None:
            yield policy.ref_wrapper
        else:
            yield lambda fn, *args, **kwargs: fn(policy.ref_model, *args, **kwargs)
    else:
        raise RuntimeError("no reference policy: full fine-tuning keeps one only when algo.beta > 0")


@contextlib.contextmanager
def _adapters_off(model: Any) -> Iterator[None]:
    """The LoRA layers pass their input through the base layer alone inside this block.

    Sets each adapter layer's switch directly: peft's ``disable_adapter()`` also toggles the adapter
    weights' ``requires_grad`` and re-checks the whole model's adapter status on the way out, a visible
    share of a tiny-model step (scripts/bench_step.py). The reference pass runs without gradients, so the switch
    is all it needs. Falls back to peft's context where its layers lack the switch.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = getattr(model, "_grpo_adapter_layers", None)
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        model._grpo_adapter_layers = layers  # the layer set of a model is fixed once it is wrapped
    if not layers or not all(hasattr(m, "_disable_adapters") for m in layers):
        with model.disable_adapter():
            yield
        return
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def check_adapter_base(checkpoint: str, name_or_path: str) -> str | None:
    """``checkpoint_base``, checked to be the configured ``model.name_or_path`` (ConfigError if not)."""
    adapter_base = checkpoint_base(checkpoint)
    if adapter_base is None:
        return None  # a full model directory replaces the base weights
    # The same config and weights, whatever the path (another $GRPO_HOME, a copy, a hub snapshot).
    require_same_base(checkpoint, adapter_base, resolve_path(name_or_path))
    return adapter_base
