"""The policy's weights as the engine loads them: Hugging Face names, LoRA merged, tied heads spelled out.

A LoRA policy is pushed as merged weights, W + (alpha / r) B A per adapted layer, computed on the fly
(the trained model is not touched: merging in place and back would drift the base weights by float
rounding every step). Merged weights sample faster than vLLM's native LoRA, which also wants the
adapter written to disk every step (``scripts/bench_rollout.py --engines --parts lora``; the figures
are in docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP shards (DTensor) are gathered (a collective: every rank pushes)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _base_and_lora(model: Any) -> tuple[Any, bool]:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model(), True
    return model, False


@torch.no_grad()
def policy_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the full model ``model`` stands for, as ``from_pretrained`` names them.

    ``model``: a transformers CausalLM or a peft PeftModel around one (adapters merged in the values).
    ``lm_head.weight`` is always included: vLLM keeps its own head otherwise, even when it is tied.
    """
    base, is_lora = _base_and_lora(model)
    seen = set()
    for name, tensor in base.state_dict().items():
        if is_lora and ".lora_" in name:
            continue
        if is_lora and ".base_layer." in name:
            module_name, leaf = name.split(".base_layer.")
            name = f"{module_name}.{leaf}"
            if leaf == "weight":
                tensor = _merged(base.get_submodule(module_name), _full(tensor))
        seen.add(name)
        yield name, _full(tensor).detach()
    if "lm_head.weight" not in seen:
        yield "lm_head.weight", _full(base.get_input_embeddings().weight).detach()


def _merged(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """weight plus the deltas of the layer's active adapters (none when adapters are switched off)."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return weight
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_A", {}):
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight
