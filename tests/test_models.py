"""Loading: LoRA policy and its reference, checkpoints that plain transformers / peft reload exactly."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from grpo_cli.config import ConfigError, LoraConfig, ModelConfig
from grpo_cli.models import completion_logprobs, load_policy, reference
from grpo_cli.rollout import encode_prompts


def _batch(tok):
    ids, mask = encode_prompts(
        tok, ["Calculate 1 + 2\nAnswer: ", "Calculate 9 * 8 - 7\nAnswer: "], False, torch.device("cpu")
    )
    completion = tok(["3", "65"], padding=True, return_tensors="pt", padding_side="right")
    full = torch.cat([ids, completion["input_ids"]], 1)
    full_mask = torch.cat([mask, completion["attention_mask"]], 1)
    return full, full_mask, ids.size(1)


def _plain_logprobs(model, ids, mask, prompt_len):
    """Reference: full logits from a plain forward, log_softmax, gather (positions skip left padding)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    lp = torch.log_softmax(logits[:, prompt_len - 1 : -1], -1)
    return lp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)


def _perturb_adapter(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_lora_checkpoint_reloads_with_plain_peft(tmp_path, random_model_dir):
    mc = ModelConfig(name_or_path=str(random_model_dir), dtype="float32", device="cpu")
    policy = load_policy(mc, LoraConfig(r=4, alpha=8), beta=0.04)
    assert policy.is_lora and policy.ref_model is None  # the reference is the adapter switched off
    _perturb_adapter(policy.model)
    ids, mask, L = _batch(policy.tokenizer)
    policy.model.eval()
    with torch.no_grad():
        ours = completion_logprobs(policy.model, ids, mask, L)
        with reference(policy) as ref:
            ref_lp = completion_logprobs(ref, ids, mask, L)
    policy.model.save_pretrained(tmp_path / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(random_model_dir)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base, tmp_path / "ckpt").eval()
        plain = _plain_logprobs(reloaded, ids, mask, L)
        base_lp = _plain_logprobs(AutoModelForCausalLM.from_pretrained(random_model_dir), ids, mask, L)
    m = mask[:, L:].bool()
    torch.testing.assert_close(ours[m], plain[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lp[m], base_lp[m], atol=1e-5, rtol=1e-5)
    assert (ours[m] - ref_lp[m]).abs().max() > 1e-3, "the adapter should change the log-probs"
    # And through our own loader, as `grpo eval checkpoint=...` does.
    again = load_policy(
        mc, LoraConfig(r=4, alpha=8), beta=0.0, checkpoint=str(tmp_path / "ckpt"), trainable=False
    )
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logprobs(again.model.eval(), ids, mask, L)[m], ours[m], atol=1e-5, rtol=1e-5
        )


def test_full_finetuning_keeps_a_reference_copy_only_with_kl(random_model_dir):
    mc = ModelConfig(name_or_path=str(random_model_dir), dtype="float32", device="cpu")
    with_kl = load_policy(mc, LoraConfig(enabled=False), beta=0.04)
    without = load_policy(mc, LoraConfig(enabled=False), beta=0.0)
    assert with_kl.ref_model is not None and not any(p.requires_grad for p in with_kl.ref_model.parameters())
    assert without.ref_model is None
    with pytest.raises(RuntimeError):
        with reference(without):
            pass


def test_adapter_of_another_base_is_refused(tmp_path, random_model_dir):
    mc = ModelConfig(name_or_path=str(random_model_dir), dtype="float32", device="cpu")
    policy = load_policy(mc, LoraConfig(r=4, alpha=8), beta=0.0)
    policy.model.save_pretrained(tmp_path / "ckpt")
    other = tmp_path / "other-base"
    AutoModelForCausalLM.from_pretrained(random_model_dir).save_pretrained(other)
    with pytest.raises(ConfigError, match="adapter was trained on"):
        load_policy(
            ModelConfig(name_or_path=str(other), dtype="float32", device="cpu"),
            LoraConfig(),
            0.0,
            checkpoint=str(tmp_path / "ckpt"),
            trainable=False,
        )


def test_missing_checkpoint_is_a_config_error(random_model_dir):
    mc = ModelConfig(name_or_path=str(random_model_dir), device="cpu")
    with pytest.raises(ConfigError, match="no such directory"):
        load_policy(mc, LoraConfig(), 0.0, checkpoint="/no/such/checkpoint", trainable=False)
