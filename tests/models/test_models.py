"""Loading: LoRA policy and its reference, checkpoints that plain transformers / peft reload exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import encode_prompts
from peft import PeftModel
from transformers import AutoModelForCausalLM

from grpo_cli.config import ConfigError, LoraConfig, ModelConfig
from grpo_cli.models import load_policy, reference
from grpo_cli.models import logprobs as model_logprobs
from grpo_cli.models.logprobs import completion_logprobs, grouped_completion_logprobs


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
            ref_lp = ref(completion_logprobs, ids, mask, L)
        after = completion_logprobs(policy.model, ids, mask, L)  # the adapter is back on
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
    torch.testing.assert_close(after, ours, atol=0, rtol=0)
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
    # Another base: the same architecture with other weights (a copy of the same weights is the same
    # base, tests/test_identity.py).
    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(other)
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


def _ragged_groups(tok, group_size=3):
    """Two prompts of different lengths (left-padded), G ragged completions each (right-padded)."""
    prompts = ["Calculate 1 + 2\nAnswer: ", "Calculate 19 * 8 - 7 + 123\nAnswer: "]
    p_ids, p_mask = encode_prompts(tok, prompts, False, torch.device("cpu"))
    texts = ["3", "3 and more words", "12", "145", "0", "one two three four five six"][: 2 * group_size]
    c = tok(texts, padding=True, return_tensors="pt", padding_side="right")
    c_ids, c_mask = c["input_ids"], c["attention_mask"]
    c_ids = torch.where(c_mask.bool(), c_ids, 7)  # padding after the end: any token, masked out
    assert p_mask.sum(1).unique().numel() == 2 and c_mask.sum(1).unique().numel() > 2
    return p_ids, p_mask, c_ids, c_mask


@pytest.mark.parametrize("lora", [True, False])
def test_grouped_logprobs_match_full_sequences(random_model_dir, lora, monkeypatch):
    """Prompt once per group + its cache for the completions == every full sequence: values and gradients."""
    torch.manual_seed(0)
    mc = ModelConfig(name_or_path=str(random_model_dir), dtype="float32", device="cpu")
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.0) if lora else LoraConfig(enabled=False)
    policy = load_policy(mc, lcfg, beta=0.04)
    if lora:
        _perturb_adapter(policy.model)
    model, G = policy.model.train(), 3
    p_ids, p_mask, c_ids, c_mask = _ragged_groups(policy.tokenizer, G)
    L, m = p_ids.size(1), c_mask.bool()
    full_ids = torch.cat([p_ids.repeat_interleave(G, 0), c_ids], 1)
    full_mask = torch.cat([p_mask.repeat_interleave(G, 0), c_mask], 1)
    weights = torch.randn(c_ids.shape)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        model.zero_grad(set_to_none=True)
        lp = fn()
        (lp * weights)[m].sum().backward()
        return lp.detach(), [p.grad.clone() for p in params]

    want, want_grads = run(lambda: completion_logprobs(model, full_ids, full_mask, L, temperature=0.7))
    monkeypatch.setattr(model_logprobs, "completion_logprobs", None)  # the shared path, not the fallback
    got, got_grads = run(
        lambda: grouped_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G, temperature=0.7)
    )
    assert got.shape == c_ids.shape
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    assert all(g is not None for g in got_grads) and len(got_grads) == len(params)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The reference: no gradient, adapter off (or the frozen copy); an arbitrary row -> prompt map.
    index = torch.tensor([1, 0, 0, 1, 1, 0])
    ids = torch.cat([p_ids[index], c_ids], 1)
    mask = torch.cat([p_mask[index], c_mask], 1)
    with torch.no_grad(), reference(policy) as ref:
        want = ref(completion_logprobs, ids, mask, L)
        got = ref(grouped_completion_logprobs, p_ids, p_mask, c_ids, c_mask, prompt_index=index)
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)


def test_grouped_logprobs_fall_back_under_gradient_checkpointing(random_model_dir):
    """transformers drops the cache under gradient checkpointing: the full-sequence path takes over."""
    mc = ModelConfig(
        name_or_path=str(random_model_dir), dtype="float32", device="cpu", gradient_checkpointing=True
    )
    policy = load_policy(mc, LoraConfig(r=4, alpha=8, dropout=0.0), beta=0.0)
    _perturb_adapter(policy.model)
    model, G = policy.model.train(), 3
    p_ids, p_mask, c_ids, c_mask = _ragged_groups(policy.tokenizer, G)
    full_ids = torch.cat([p_ids.repeat_interleave(G, 0), c_ids], 1)
    full_mask = torch.cat([p_mask.repeat_interleave(G, 0), c_mask], 1)
    m = c_mask.bool()
    want = completion_logprobs(model, full_ids, full_mask, p_ids.size(1))
    got = grouped_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    got[m].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fsdp_staging_keeps_the_weights_in_cpu_memory_for_a_gpu_run(random_model_dir):
    """Under FSDP the weights stay on the CPU until each layer's shard is moved; nothing touches the GPU here."""
    mc = ModelConfig(name_or_path=str(random_model_dir), dtype="float32", device="cuda")
    policy = load_policy(mc, LoraConfig(enabled=False), beta=0.04, stage_on_cpu=True)
    assert policy.device == torch.device("cuda")  # where the inputs go once the model is sharded
    for model in (policy.model, policy.ref_model):
        assert {p.device.type for p in model.parameters()} == {"cpu"}


# ---------------------------------------------------------------------------- bfloat16

# bf16 keeps 8 significant bits: one rounding of a logit of size 10 (the tiny model's reach ~11) moves
# it by up to 10 * 2^-9 = 0.02, and the head sees hidden states already rounded 4 layers deep. Measured
# on the tiny model over 4 sampled rollouts (LoRA and full), |log p_bf16 - log p_fp32| reached 0.087
# nats at most and 0.011 on average; the bounds leave about twice that.
BF16_MAX_GAP, BF16_MEAN_GAP = 0.15, 0.02


def _dtypes(model):
    """{(is a LoRA weight, dtype, trainable)} over the model's parameters."""
    return {("lora_" in n, p.dtype, p.requires_grad) for n, p in model.named_parameters()}


def test_bf16_base_weights_carry_float32_lora_adapters_on_load_resume_and_eval(tmp_path, random_model_dir):
    """model.dtype=bfloat16 with LoRA: the base weights bf16 and frozen, the adapter float32 (bf16 would
    round its small updates away), and so on reload, for training (resume) and for evaluation."""
    mc = ModelConfig(name_or_path=str(random_model_dir), dtype="bfloat16", device="cpu")
    policy = load_policy(mc, LoraConfig(r=4, alpha=8), beta=0.04)
    assert _dtypes(policy.model) == {(False, torch.bfloat16, False), (True, torch.float32, True)}
    policy.model.save_pretrained(tmp_path / "ckpt")
    resumed = load_policy(mc, LoraConfig(r=4, alpha=8), beta=0.04, checkpoint=str(tmp_path / "ckpt"))
    assert _dtypes(resumed.model) == {(False, torch.bfloat16, False), (True, torch.float32, True)}
    evaluated = load_policy(mc, LoraConfig(), 0.0, checkpoint=str(tmp_path / "ckpt"), trainable=False)
    assert _dtypes(evaluated.model) == {(False, torch.bfloat16, False), (True, torch.float32, False)}


@pytest.mark.parametrize("lora", [True, False])
def test_bf16_logprobs_and_loss_are_float32_within_bf16_rounding_of_float32(tiny_model_path, lora):
    """The same tiny model in bf16 and fp32, on completions it sampled: the policy's and the reference's
    log-probs are float32 either way and differ by the bf16 rounding above; so does the GRPO loss."""
    from helpers import arithmetic_rollout, dtype_twins

    from grpo_cli.config import AlgoConfig
    from grpo_cli.core.advantages import group_advantages
    from grpo_cli.core.loss import policy_loss

    f32, bf16 = dtype_twins(tiny_model_path, lora)
    ro = arithmetic_rollout(f32)
    m, G = ro.completion_mask.bool(), ro.group_size
    args = (ro.prompt_ids[::G], ro.prompt_mask[::G], ro.completion_ids, ro.completion_mask, G)
    adv = group_advantages(ro.rewards, G)
    out = {}
    for name, policy in (("f32", f32), ("bf16", bf16)):
        lp = policy.run(grouped_completion_logprobs, *args)
        with torch.no_grad(), reference(policy) as ref:
            ref_lp = ref(grouped_completion_logprobs, *args)
        loss, _ = policy_loss(lp, None, ref_lp, adv, ro.completion_mask, AlgoConfig(group_size=G, beta=0.04))
        out[name] = (lp.detach(), ref_lp, loss.detach())
        assert lp.dtype == ref_lp.dtype == loss.dtype == torch.float32 and lp.requires_grad
    assert next(p for n, p in bf16.model.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    for got, want in zip(out["bf16"][:2], out["f32"][:2]):
        gap = (got - want)[m].abs()
        assert gap.max() <= BF16_MAX_GAP and gap.mean() <= BF16_MEAN_GAP, (gap.max(), gap.mean())
    if lora:  # the adapter moves the log-probs far more than bf16 does: a lost adapter would show
        assert (out["f32"][0] - out["f32"][1])[m].abs().mean() > 5 * BF16_MEAN_GAP
    # On-policy the loss is beta * mean k3 in value, and k3 moves by about |d log p|: 0.04 * 0.02.
    assert abs(out["bf16"][2] - out["f32"][2]) <= 0.04 * BF16_MEAN_GAP
